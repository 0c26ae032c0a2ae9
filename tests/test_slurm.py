"""Sweeps through a real SLURM scheduler: a one-node cluster on localhost (compresslab.testing.slurm).

The ``slurm``-marked tests submit to it; the first few tests check the same pieces without a
scheduler (checkpoint on the preemption signal, the sacct stand-in, failure records, W&B run ids).
One cluster serves the whole session. The tests skip where it can't run (not root, not Linux, the
packages missing: the reason says which); with COMPRESSLAB_REQUIRE_SLURM=1 (.ci/run) that is an error.
Jobs are tiny (digits, 1-2 epochs of a few batches) except the preemption pair, whose fit must be
long enough to be caught in the middle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from compresslab.cluster import record_scheduler_failure
from compresslab.slurm_env import slurm_fields
from compresslab.testing.sacct import squeue_command
from compresslab.testing.slurm import HIGH, LocalSlurmCluster, unavailable_reason
from compresslab.track.results import read_results, write_results
from compresslab.track.wandb_glue import wandb_run_id

from conftest import FAST

#: The launcher preset for the local cluster, plus what every test job shares.
#: (timeout_min stays 30: submitit calls any USR2 in the first 80% or the last 10 min a time-out)
LAUNCHER = ["-m", "hydra/launcher=slurm_local"]


@pytest.fixture(scope="session")
def slurm_cluster(request):
    """The session's local cluster (started on first use, stopped by its pids at the end). `make test`
    runs each test file on one xdist worker (--dist loadfile): keep the tests that use it in this file."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("COMPRESSLAB_REQUIRE_SLURM") == "1":
            pytest.fail(f"COMPRESSLAB_REQUIRE_SLURM=1 but the slurm tests can't run: {reason}", pytrace=False)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="compresslab-slurm-"))
    cluster = LocalSlurmCluster(root).start()
    yield cluster
    t0 = time.perf_counter()
    cluster.stop()
    stopped_s = time.perf_counter() - t0
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"local SLURM cluster ({cluster.cpus} CPUs): started in {cluster.started_s:.1f} s, "
                            f"stopped in {stopped_s:.1f} s (fixture time {cluster.started_s + stopped_s:.1f} s)")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(slurm_cluster, record_property):
    """The session's cluster, for one test; the test is tagged in the junit report (.ci/run checks it ran)."""
    record_property("slurm_scheduler", str(slurm_cluster.root))
    return slurm_cluster


def _sweep(cluster: LocalSlurmCluster, tmp_path: Path, args: list[str], name: str, background: bool = False,
           timeout: float = 400):
    """Run ``compresslab -m hydra/launcher=slurm_local ...`` against ``cluster`` (or start it)."""
    sweep = tmp_path / name
    cmd = [sys.executable, "-m", "compresslab.cli", *LAUNCHER, *args, f"hydra.sweep.dir={sweep}",
           f"paths.teacher_cache={tmp_path / 'teachers'}", f"hydra.launcher.name={name}"]
    env = {**cluster.client_env(), "WANDB_MODE": "offline"}
    if background:
        return sweep, subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    out.wall_s = time.perf_counter() - t0
    return sweep, out


def _records(sweep: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/results.json")}


def _slurm_log(sweep: Path, job_id: str, task: int = 0) -> str:
    return (sweep / ".submitit" / job_id / f"{job_id}_{task}_log.out").read_text()


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the sweep ended while waiting for {what}:\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- without a scheduler ---------------------------------------------------------------------------

def test_preemption_signal_writes_last_ckpt_then_hands_over_and_the_fit_resumes_there(tmp_path):
    import signal as sig

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import Callback

    from compresslab.data import DigitsDataModule
    from compresslab.models import build_model
    from compresslab.fit_callbacks import JobRequeued
    from compresslab.train import ClassifierModule, fit_with_checkpoints

    calls = []
    last = tmp_path / "ckpt" / "last.ckpt"

    def submitit_like(signum, frame):  # what submitit's handler does: requeue, then sys.exit(-1)
        calls.append(torch.load(last, weights_only=True)["epoch"] if last.exists() else None)
        raise SystemExit(-1)

    class SignalAt(Callback):  # the scheduler: USR2 in the middle of epoch 1
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 2 and not calls:
                os.kill(os.getpid(), sig.SIGUSR2)

    def fit():
        pl.seed_everything(0)
        dm = DigitsDataModule(batch_size=64)
        dm.setup("fit")
        module = ClassifierModule(build_model({"_target_": "compresslab.models.MLP"}, dm.input_shape, 10), 10,
                                  optimizer=lambda p: torch.optim.Adam(p, 1e-3))
        factory = lambda **kw: pl.Trainer(enable_progress_bar=False, enable_model_summary=False,  # noqa: E731
                                          limit_train_batches=5, limit_val_batches=1, **kw)
        return fit_with_checkpoints(module, dm, factory, tmp_path / "ckpt", 3, callbacks=[SignalAt()])

    previous = sig.signal(sig.SIGUSR2, submitit_like)
    try:
        with pytest.raises(JobRequeued, match="written at epoch 1"):
            fit()
        assert calls == [1]  # handed over once, after last.ckpt held epoch 1
        state = torch.load(last, weights_only=True)
        assert state["global_step"] == 8  # 5 steps of epoch 0, and batches 0-2 of epoch 1 (the signal came in 2)
        assert sig.getsignal(sig.SIGUSR2) is submitit_like  # the replaced handler is back
        result = fit()  # the requeued job: same dir, resumes
    finally:
        sig.signal(sig.SIGUSR2, previous)
    assert result["resumed_from"] == str(last) and result["epochs_run"] == 3
    (stop,) = result["preemptions"]
    assert (stop["signal"], stop["epoch"], stop["step"]) == ("SIGUSR2", 1, 8)
    assert (stop["resumed_at_epoch"], stop["resumed_at_step"]) == (1, 8)


def test_checkpoint_on_preemption_leaves_a_run_without_a_handler_alone(tmp_path):
    import signal as sig

    from compresslab.fit_callbacks import CheckpointOnPreemption

    assert sig.getsignal(sig.SIGUSR2) in (sig.SIG_DFL, None)
    callback = CheckpointOnPreemption(tmp_path / "last.ckpt")
    callback.on_train_start(type("T", (), {"current_epoch": 0, "global_step": 0})(), None)
    assert sig.getsignal(sig.SIGUSR2) in (sig.SIG_DFL, None) and callback._previous is None


def test_sacct_stand_in_asks_squeue_for_the_same_fields():
    assert squeue_command(["JobID", "State", "NodeList"], ["12", "13_2"]) == [
        "squeue", "-h", "-t", "all", "-o", "%i|%T|%N", "-j", "12,13_2"]
    with pytest.raises(SystemExit, match="ExitCode"):
        squeue_command(["JobID", "ExitCode"], ["1"])


def test_slurm_fields_name_the_array_task_and_count_requeues():
    env = {"SLURM_JOB_ID": "40", "SLURM_ARRAY_JOB_ID": "37", "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "2",
           "SLURM_JOB_PARTITION": "debug", "SLURM_JOB_NODELIST": "vm", "SLURM_NTASKS": "2"}
    fields = slurm_fields(env)
    assert (fields["slurm_job_id"], fields["restarts"], fields["slurm"]["ntasks"]) == ("37_3", 2, 2)
    assert slurm_fields({"SLURM_JOB_ID": "5"})["slurm_job_id"] == "5"
    assert slurm_fields({}) == {"slurm_job_id": None, "restarts": 0, "slurm": None}


def test_scheduler_failures_are_recorded_over_the_jobs_own_record(tmp_path):
    running = tmp_path / "0"
    running.mkdir()
    write_results(running / "results.json", {"status": "running", "error": None, "axes": {"seed": 0}})
    record_scheduler_failure(running, "SLURM job 7_0 ended CANCELLED", "7_0", "CANCELLED", ["seed=0"], "log")
    record = read_results(running / "results.json")
    assert (record["status"], record["slurm_state"], record["axes"]) == ("failed", "CANCELLED", {"seed": 0})
    assert record["error"] == "SLURM job 7_0 ended CANCELLED" and record["finished_at"]
    done = tmp_path / "1"
    done.mkdir()
    write_results(done / "results.json", {"status": "completed", "error": None})
    record_scheduler_failure(done, "late cancel", "7_1", "CANCELLED", [], "")
    assert read_results(done / "results.json") == {"status": "completed", "error": None}
    record_scheduler_failure(tmp_path / "2", "SLURM job 7_2 ended CANCELLED", "7_2", "CANCELLED", ["seed=2"], "")
    short = read_results(tmp_path / "2" / "results.json")
    assert (short["status"], short["stage"], short["overrides"]) == ("failed", "scheduler", ["seed=2"])


def test_wandb_run_id_is_kept_for_a_resumed_run(tmp_path):
    first = wandb_run_id(tmp_path)
    assert wandb_run_id(tmp_path) == first == (tmp_path / "wandb" / "run_id").read_text().strip()
    assert wandb_run_id(tmp_path, resume=False) != first  # resume=false starts a new W&B run


# -- through the local cluster -----------------------------------------------------------------------

@pytest.mark.slurm
def test_two_by_two_sweep_runs_four_slurm_jobs_and_reports(cluster, tmp_path):
    # seed varies slowest: jobs 0 and 1 (seed 0) start together and want the same teacher
    sweep, out = _sweep(cluster, tmp_path, [
        "seed=0,1", "student=lenet5,mlp", *FAST, "+hydra.callbacks.sweep_summary.report={rows: student, cols: seed}",
    ], "grid")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"2x2 sweep through SLURM: {out.wall_s:.1f} s wall")
    records = _records(sweep)
    assert sorted(records) == [0, 1, 2, 3]
    assert all(r["status"] == "completed" for r in records.values())
    job_ids = {r["slurm_job_id"] for r in records.values()}
    assert len(job_ids) == 4 and all(re.fullmatch(r"\d+_[0-3]", j) for j in job_ids)  # one array, 4 tasks
    assert {r["slurm"]["partition"] for r in records.values()} == {"debug"}
    assert all(r["restarts"] == 0 for r in records.values())
    assert {(r["axes"]["seed"], r["axes"]["student"]) for r in records.values()} == {
        (0, "lenet5"), (0, "mlp"), (1, "lenet5"), (1, "mlp")}
    # each job's own SLURM log exists, and the teacher cache lock held across jobs: 2 teachers, each trained once
    for record in records.values():
        job = record["slurm_job_id"]
        assert f"Starting with JobEnvironment(job_id={job}" in _slurm_log(sweep, job)
    for seed in (0, 1):
        sources = sorted(r["teacher"]["source"] for r in records.values() if r["axes"]["seed"] == seed)
        assert sources == ["cache", "trained"], (seed, sources)
    assert len(list((tmp_path / "teachers").glob("*.pt"))) == 2
    # the end-of-sweep summary and report, printed by the sweep process
    assert "sweep: 4 completed, 0 pruned, 0 failed" in out.stdout
    report = (sweep / "report.md").read_text()
    assert "lenet5" in report and "mlp" in report and "(1)" in report


@pytest.mark.slurm
def test_ddp_job_takes_its_two_ranks_from_srun(cluster, tmp_path):
    sweep, out = _sweep(cluster, tmp_path, [
        "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", *FAST, "teacher=none", "measure.defer=false",
    ], "ddp")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"DDP job through SLURM: {out.wall_s:.1f} s wall")
    records = _records(sweep)
    assert list(records) == [0] and records[0]["status"] == "completed"
    record = records[0]
    assert record["slurm"]["ntasks"] == 2
    job = record["slurm_job_id"]
    ranks = {}
    for task in (0, 1):
        text = _slurm_log(sweep, job, task)
        found = re.findall(r"rank (\d)/2: SLURM_PROCID=(\d) .*cluster_environment=(\w+)", text)
        assert len(found) >= 1, text[-2000:]
        ranks[task] = found[0]
        assert f"GLOBAL_RANK: {task}, MEMBER: {task + 1}/2" in text + _slurm_log_err(sweep, job, task)
    print(f"DDP job {job}: ranks (global_rank, SLURM_PROCID, environment) = {sorted(ranks.values())}")
    assert ranks == {0: ("0", "0", "SLURMEnvironment"), 1: ("1", "1", "SLURMEnvironment")}
    # one run dir for both ranks: no re-launched processes or job dirs, one results.json, written by rank 0
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0"]
    assert not list(sweep.glob("0/*rank1*"))
    assert len(list(sweep.rglob("results.json"))) == 1
    assert record["student"]["acc_top1"] is not None


def _slurm_log_err(sweep: Path, job_id: str, task: int) -> str:
    return (sweep / ".submitit" / job_id / f"{job_id}_{task}_log.err").read_text()


@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_resumes_where_it_was(cluster, tmp_path):
    # two identical jobs on one CPU each; an urgent job then takes one job's CPUs: SLURM preempts it
    per_job = max(1, cluster.cpus // 2)
    epochs = 40  # full digits epochs: the fit must outlast the seconds from the first last.ckpt to the signal
    # (an mlp epoch on resident digits tensors is ~0.1 s since issue #25; 10 epochs ended before the signal)
    sweep, proc = _sweep(cluster, tmp_path, [
        "+run=a,b", "teacher=none", "student=mlp", f"student.epochs={epochs}", "logger=wandb",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "measure.fresh_process=false",
        "measure.latency_round_ms=1", "measure.latency_rounds=2", "measure.defer=false",
        f"hydra.launcher.cpus_per_task={per_job}",
    ], "preempt", background=True)
    try:
        ckpts = [sweep / str(i) / "checkpoints" / "student" / "last.ckpt" for i in (0, 1)]
        _wait_for(lambda: all(p.exists() for p in ckpts), 300, "both jobs to be training", proc)
        urgent = cluster.run("sbatch", "--parsable", "-p", HIGH, "-c", str(cluster.cpus - per_job),
                                   "-o", str(tmp_path / "urgent-%j.out"), "--wrap", "sleep 1").stdout.strip()
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    records = _records(sweep)
    assert [r["status"] for r in records.values()] == ["completed", "completed"]
    preempted = [r for r in records.values() if r["restarts"] >= 1]
    reference = [r for r in records.values() if r["restarts"] == 0]
    assert len(preempted) == 1 and len(reference) == 1, [(r["slurm_job_id"], r["restarts"]) for r in records.values()]
    p, ref = preempted[0], reference[0]
    assert cluster.run("squeue", "-h", "-t", "all", "-j", urgent, "-o", "%T").stdout.strip() == "COMPLETED"
    # checkpointed on the signal, requeued, resumed from last.ckpt at the epoch and step it had reached
    stops = p["student"]["preemptions"]
    assert stops, "the signal came after the fit: it ended before SLURM preempted the job"
    assert len(stops) == 1 and stops[0]["signal"] == "SIGUSR2"
    stop = stops[0]
    assert 0 <= stop["epoch"] < epochs - 1
    assert stop["resumed_at_epoch"] == stop["epoch"] and stop["resumed_at_step"] == stop["step"] > 0
    assert stop["slurm_job_id"] == stop["resumed_in_job"] == p["slurm_job_id"] and stop["resumed_restart"] == 1
    assert p["student"]["resumed_from"].endswith("last.ckpt") and ref["student"]["resumed_from"] is None
    assert ref["student"]["preemptions"] == []
    assert p["student"]["epochs_run"] == ref["student"]["epochs_run"] == epochs
    log = _slurm_log(sweep, p["slurm_job_id"])
    assert "this job is preempted" in log and "Requeued job" in log
    # the requeued run left no result behind: the sweep waited for the resumed one
    assert len(re.findall(r"^submitit INFO .* - Job completed successfully$", log, re.M)) == 1
    assert log.index("Requeued job") < log.index("resumed at epoch")
    # same seed, same config: the resumed run ends where the uninterrupted one does, within noise
    acc_p, acc_ref = p["student"]["acc_top1"], ref["student"]["acc_top1"]
    print(f"preempted job {p['slurm_job_id']}: signal at epoch {stop['epoch']} step {stop['step']}, resumed at "
          f"epoch {stop['resumed_at_epoch']} step {stop['resumed_at_step']}; acc {acc_p:.4f} vs uninterrupted "
          f"{acc_ref:.4f}")
    # noise: after the resume the data order differs (a fresh shuffle), so the two runs differ like two
    # samples; 3 standard errors of a difference of two accuracies on the test split is the tolerance
    from compresslab.data import DigitsDataModule

    dm = DigitsDataModule()
    dm.setup("test")
    n_test = len(dm.test_set)
    tolerance = 3 * (2 * acc_ref * (1 - acc_ref) / n_test) ** 0.5
    print(f"|difference| {abs(acc_p - acc_ref):.4f}, tolerance {tolerance:.4f} ({n_test} test images)")
    assert acc_ref > 0.85 and abs(acc_p - acc_ref) <= tolerance
    # W&B: the requeued job continued its run (same id, two offline segments), not a second run
    runs = sorted((Path(p["run_dir"]) / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs
    assert len(list((Path(ref["run_dir"]) / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slurm
def test_failed_and_cancelled_jobs_are_recorded_and_the_sweep_finishes(cluster, tmp_path):
    # job 0 will be cancelled while it runs (200 epochs: it can't finish first), job 1 has a bad
    # override (0 epochs), job 2 is fine
    sweep, proc = _sweep(cluster, tmp_path, [
        "student.epochs=200,0,1", *[o for o in FAST if not o.startswith("student.epochs")], "teacher=none",
        "measure.defer=false",
    ], "faults", background=True)
    try:
        first = sweep / "0" / "results.json"
        _wait_for(first.exists, 300, "job 0 to start its run", proc)
        job0 = json.loads(first.read_text())["slurm_job_id"]
        cluster.run("scancel", job0)
        t_cancel = time.monotonic()
        out, err = proc.communicate(timeout=300)
        after_cancel_s = time.monotonic() - t_cancel
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0  # the sweep reports its failures with its exit status...
    records = _records(sweep)
    assert sorted(records) == [0, 1, 2]
    assert [r["status"] for r in (records[0], records[1], records[2])] == ["failed", "failed", "completed"]
    assert records[0]["slurm_state"] == "CANCELLED" and f"SLURM job {job0} ended CANCELLED" in records[0]["error"]
    assert "student.epochs=0 is not allowed" in records[1]["error"]
    assert records[2]["student"]["epochs_run"] == 1
    assert "sweep: 1 completed, 0 pruned, 2 failed" in out  # ...after every job ended, with a summary
    assert "2 of 3 sweep jobs failed" in err
    print(f"cancelled job {job0}: {records[0]['error']!r}; the sweep ended {after_cancel_s:.1f} s after scancel")
