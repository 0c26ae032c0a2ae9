"""Attacks and faults, kept as regression tests: crafted files that try to run code, and the
failures every run must survive with a record (see also test_pipeline's pickle and kill -9 cases)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from compresslab.artifact import DENSE_FORMAT, atomic_torch_save, load_model_file
from compresslab.errors import CheckpointError, ConfigError


@pytest.fixture
def hub_repo(tmp_path):
    """A local torch.hub repo whose hubconf.py writes a marker file when it is imported."""
    repo, marker = tmp_path / "hubrepo", tmp_path / "PWNED"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\n"
        "def m(**kwargs):\n    import torch\n    return torch.nn.Linear(1, 1)\n")
    return repo, marker


def crafted_specs(repo) -> dict[str, dict]:
    """Arch specs that name something other than a model factory of the zoo."""
    hub = {"repo_or_dir": str(repo), "model": "m", "source": "local"}
    return {
        "hub_load_through_common": {"_target_": "compresslab.models.common.torch.hub.load", **hub},
        "hub_load_through_tv": {"_target_": "compresslab.models.tv.torch.hub.load", **hub},
        "imported_helper": {"_target_": "compresslab.models.simple.require_image_input", "model_name": "x"},
        "class_defined_elsewhere": {"_target_": "compresslab.models.common.nn.Linear", "in_features": 1},
        "non_factory_class": {"_target_": "compresslab.models.resnet_cifar.BasicBlock"},
        "dunder_path": {"_target_": "compresslab.models.simple.MLP.__init__.__globals__"},
        "builtins": {"_target_": "compresslab.models.__builtins__.exec", "source": "print(1)"},
    }


def dense_file(path, arch):
    atomic_torch_save({"format": DENSE_FORMAT, "arch": arch, "input_shape": [1, 8, 8], "num_classes": 10,
                       "state_dict": {}, "meta": {}}, path)
    return path


def test_crafted_arch_specs_are_refused_by_load_model_file(tmp_path, hub_repo):
    repo, marker = hub_repo
    for name, spec in crafted_specs(repo).items():
        path = dense_file(tmp_path / f"{name}.pt", spec)
        with pytest.raises(ConfigError, match="Refused architecture _target_") as err:
            load_model_file(path)
        assert "compresslab.models.LeNet5" in str(err.value)  # says what is accepted
    assert not marker.exists()


def test_artifact_formats_outside_the_table_are_refused(tmp_path, hub_repo):
    _, marker = hub_repo
    for fmt, extra in [("evil/1", {"loader_module": "os"}),
                       ("compresslab.models.common.torch.hub.load", {"loader_module": "compresslab.models.common"}),
                       ("compresslab.sparse/1.__class__", {}), (None, {})]:
        atomic_torch_save({"format": fmt, **extra}, tmp_path / "a.pt")
        with pytest.raises(CheckpointError, match="Refused artifact format"):
            load_model_file(tmp_path / "a.pt")
    atomic_torch_save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a dict"):
        load_model_file(tmp_path / "list.pt")
    assert not marker.exists()


def test_a_crafted_teacher_planted_in_the_cache_is_refused(make_cfg, hub_repo):
    from compresslab.pipeline import run_experiment
    from compresslab.teacher import teacher_cache_path

    repo, marker = hub_repo
    cfg = make_cfg()
    dense_file(teacher_cache_path(cfg), crafted_specs(repo)["hub_load_through_common"])
    # refused as soon as its spec is compared with the configured teacher's, before anything is built
    with pytest.raises(CheckpointError, match="is not the configured teacher: its arch is"):
        run_experiment(cfg)
    assert not marker.exists()
    record = json.loads((Path(cfg.paths.run_dir) / "results.json").read_text())
    assert record["status"] == "failed" and "not the configured teacher" in record["error"]


def test_crafted_files_are_refused_in_the_fresh_measuring_process(tmp_path, hub_repo):
    from compresslab.measure.fresh import measure_in_fresh_process

    repo, marker = hub_repo
    path = dense_file(tmp_path / "student.pt", crafted_specs(repo)["hub_load_through_common"])
    with pytest.raises(RuntimeError, match="Refused architecture"):
        measure_in_fresh_process({"student": path}, torch.zeros(1, 1, 8, 8), torch.zeros(2, 1, 8, 8))
    assert not marker.exists()


def test_the_report_never_builds_models_from_records(tmp_path, hub_repo):
    from compresslab.cli import report_main

    repo, marker = hub_repo
    spec = crafted_specs(repo)["hub_load_through_common"]
    run = tmp_path / "sweep" / "0"
    run.mkdir(parents=True)
    artifact = dense_file(run / "student.pt", spec)
    (run / "results.json").write_text(json.dumps({
        "status": "completed", "axes": {"student": "x", "seed": 0},
        "config": {"student": {"arch": spec}}, "student": {"acc_top1": 0.5, "artifact": str(artifact)}}))
    report_main([str(tmp_path / "sweep"), "--rows", "student", "--cols", "", "--out", str(tmp_path / "report")])
    assert not marker.exists()


def test_every_artifact_format_and_zoo_model_is_in_its_allowlist():
    from compresslab.artifact import ARTIFACT_LOADERS
    from compresslab.compress.codecs import lsq_pact as actquant, fuse_bn as fused, int8 as int8_pt2e, lowbit, lowrank, ort_int8 as onnx_qdq, weight_sharing as shared, sparse
    from compresslab.compress.codecs import structured
    from compresslab.models.common import MODEL_FACTORIES

    formats = [lowbit.FORMAT, lowrank.FORMAT, sparse.FORMAT,
               shared.FORMAT, structured.FORMAT, int8_pt2e.FORMAT, actquant.FORMAT,
               fused.FORMAT, onnx_qdq.FORMAT]
    from compresslab.compress.codecs import nm, packed_int, weight_only

    formats += [nm.FORMAT, weight_only.FORMAT, packed_int.FORMAT]
    assert sorted(formats) == ARTIFACT_LOADERS.names()
    assert all(callable(ARTIFACT_LOADERS.resolve(f)) for f in formats)
    import compresslab.models as zoo

    for name in zoo.__all__:
        if name != "build_model":
            assert MODEL_FACTORIES.resolve(f"compresslab.models.{name}") is getattr(zoo, name)


# ---- every failure leaves a record ---------------------------------------------------
def _cli(args, cwd, timeout=300, flags=()):
    import os
    import subprocess

    from conftest import FAST, ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "compresslab.cli", *flags, *FAST, *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def test_a_sweep_job_whose_config_cannot_be_read_is_counted_and_recorded(tmp_path):
    sweep = tmp_path / "sweep"
    out = _cli(["seed=0,abc", "teacher=none", f"hydra.sweep.dir={sweep}",
                f"paths.teacher_cache={tmp_path / 'teachers'}"], tmp_path, flags=["-m"])
    assert out.returncode != 0
    assert "1 completed, 0 pruned, 1 failed" in out.stdout
    bad = json.loads((sweep / "1" / "results.json").read_text())
    assert bad["status"] == "failed" and "seed must be an integer, got 'abc'" in bad["error"]
    assert "seed=abc" in bad["overrides"] and bad["traceback"]
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "completed"


def test_the_sweep_summary_counts_a_launched_job_that_left_no_record(tmp_path):
    from omegaconf import OmegaConf

    from compresslab.track.results import collect_job_results
    from compresslab.track.sweep import launched_job_dirs

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text(json.dumps({"status": "completed", "student": {"acc_top1": 1}}))
    config = OmegaConf.create({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": ["seed=0,1", "student.epochs=1"]},
        "sweep": {"dir": str(tmp_path), "subdir": "${hydra.job.num}"}}})
    records = collect_job_results(tmp_path, launched_job_dirs(config))
    assert [r["status"] for r in records] == ["completed", "failed"]
    assert "left no results.json" in records[1]["error"]


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "seed must be an integer"),
    ("+foo=${oc.env:COMPRESSLAB_NO_SUCH_VARIABLE}", "COMPRESSLAB_NO_SUCH_VARIABLE"),
])
def test_a_run_whose_config_cannot_be_read_leaves_a_failed_record(make_cfg, override, message):
    from compresslab.pipeline import run_experiment

    cfg = make_cfg([override])
    with pytest.raises(Exception, match=message):
        run_experiment(cfg)
    record = json.loads((Path(cfg.paths.run_dir) / "results.json").read_text())
    assert record["status"] == "failed" and message in record["error"] and record["stage"] == "config"


@pytest.mark.parametrize("overrides, message", [
    (["distill=kd", "distill.logit_loss.temperature=0"], "temperature must be > 0"),
    (["distill=fitnet", "distill.feature_losses.fitnet.teacher_layers=[no.such.layer]"], "no.such.layer"),
    (["dataset.batch_size=0"], "dataset.batch_size=0 is not allowed: expected an integer >= 1"),
    (["student.epochs=0"], "student.epochs=0 is not allowed: expected an integer >= 1"),
])
def test_config_errors_fail_before_any_fit(make_cfg, overrides, message):
    import time

    from compresslab.pipeline import run_experiment

    cfg = make_cfg([*overrides, "teacher.epochs=3"])
    start = time.perf_counter()
    with pytest.raises(Exception, match=message):
        run_experiment(cfg)
    assert time.perf_counter() - start < 10
    assert not Path(cfg.paths.teacher_cache).exists() or not any(Path(cfg.paths.teacher_cache).iterdir())
    assert not (Path(cfg.paths.run_dir) / "checkpoints").exists()


def _axis_pairs():
    import itertools

    from conftest import CONF_DIR

    options = {axis: sorted(p.stem for p in (CONF_DIR / axis).glob("*.yaml")) for axis in ("prune", "quant", "lowrank")}
    for (a, xs), (b, ys) in itertools.combinations(options.items(), 2):
        for x, y in itertools.product(xs, ys):
            if "none" not in (x, y):
                yield f"{a}={x}", f"{b}={y}"


#: pairs with no student both methods accept, refused by validate (checked above)
CANNOT_COMBINE = {("prune=heads", "quant=ort_int8"): "heads needs attention, ort_int8 refuses attention models"}

#: the LLM quantization methods: hidden nn.Linear layers only, unless quant.include_classifier=true
LINEAR_ONLY_QUANT = {"quant=rtn", "quant=gptq", "quant=awq", "quant=smoothquant"}

PAIR_OVERRIDES = ["teacher=none", "student.epochs=12", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                  "measure.latency_round_ms=1", "measure.latency_rounds=1"]


def test_every_pair_of_compression_axes_composes_and_validates(make_cfg):
    from compresslab.pipeline import build_datamodule, validate

    dm, refused = None, []
    pairs = list(_axis_pairs())
    assert len(pairs) >= 55
    for pair in pairs:
        bn_student = ["student=resnet8"] if "prune=slimming" in pair else []  # slimming ranks BN scales
        if "prune=heads" in pair:  # head pruning needs attention heads
            bn_student = ["student=vit_tiny", "student.arch.depth=1"]
        if "prune=slimming" in pair and set(pair) & LINEAR_ONLY_QUANT:  # resnet8's one Linear is its classifier
            bn_student.append("quant.include_classifier=true")
        cfg = make_cfg([*pair, *PAIR_OVERRIDES, *bn_student])
        if dm is None:
            dm = build_datamodule(cfg)
            dm.setup("fit")
        try:
            methods = validate(cfg, dm)  # a pair that can't work must be refused here, not after training
        except Exception as exc:
            if pair in CANNOT_COMBINE and isinstance(exc, ConfigError):
                continue
            refused.append(f"{pair}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        assert pair not in CANNOT_COMBINE, f"{pair} should be refused: {CANNOT_COMBINE[pair]}"
        assert len(methods) == 2, pair
    assert not refused, "\n".join(refused)


@pytest.mark.slow
def test_structured_pruning_combines_with_every_other_axis_end_to_end(tmp_path):
    """structured × {int8, low-bit, weight sharing, low rank} used to train and then fail at export."""
    from conftest import compose_config

    from compresslab.artifact import load_model_file
    from compresslab.pipeline import run_experiment

    # 5 epochs, not the 12 every pair's default schedule needs: pruning at epoch 2 as by default, then a
    # decomposition (start_epoch -2: epoch 3) or weight sharing (-2) after it, as in the 12-epoch order
    short = [o for o in PAIR_OVERRIDES if not o.startswith("student.epochs=")] + ["student.epochs=5"]
    for pair in [p for p in _axis_pairs() if "prune=structured" in p]:
        later = ["lowrank.start_epoch=-2"] if any(p.startswith("lowrank=") for p in pair) else []
        record = run_experiment(compose_config(tmp_path / "_".join(pair).replace("=", "-"), [*pair, *short, *later]))
        assert record["status"] == "completed", pair
        student = load_model_file(record["student"]["artifact"])
        assert record["student"]["params"] < record["reference"]["params"], pair
        assert student(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.slow
def test_kd_structured_pruning_and_int8_in_one_run_measured_in_a_fresh_process(make_cfg):
    from compresslab.artifact import read_payload
    from compresslab.pipeline import run_experiment

    record = run_experiment(make_cfg(["distill=kd", "prune=structured", "quant=ptq_int8", "student.epochs=4",
                                      "prune.start=1", "measure.fresh_process=true"]))
    student = record["student"]
    assert record["status"] == "completed" and student["measured_in"] == "fresh_process"
    assert student["quant"]["compute"] == "int8" and student["params"] < record["reference"]["params"]
    assert student["fresh_process_max_abs_diff"] < 1e-4
    assert read_payload(student["artifact"])["structure"]["resized"]  # the pruned shapes travel in the file


# ---- faults: full disk, damaged checkpoints, kill -9, bad UTF-8 ------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 700 KB tmpfs (needs root on Linux, as in CI); skipped where it can't be mounted. It holds
    the first epoch's best.ckpt and last.ckpt of lenet5 (~270 KB each), not the next save."""""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_leaves_a_failed_record_no_temp_file_and_no_torn_checkpoint(small_tmpfs, tmp_path):
    from conftest import compose_config

    from compresslab.pipeline import run_experiment

    cfg = compose_config(tmp_path, [f"paths.run_dir={small_tmpfs / 'run'}", "student.epochs=3",
                                    "trainer.limit_train_batches=null"])
    with pytest.raises(OSError, match="No space left"):
        run_experiment(cfg)
    files = [p for p in small_tmpfs.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")], files
    record = json.loads((small_tmpfs / "run" / "results.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
    checkpoints = [p for p in files if p.suffix == ".ckpt"]
    assert checkpoints  # the first epoch's saves fit; a later one did not
    for ckpt in checkpoints:
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == 0  # the old one, not torn


def test_on_a_full_disk_the_failure_record_keeps_the_run_error_and_wins_over_the_write_error(small_tmpfs):
    from compresslab.track.results import write_final_results, write_results

    path = small_tmpfs / "results.json"
    write_results(path, {"status": "running", "error": None, "run_id": "r"})
    with open(small_tmpfs / "filler", "wb", buffering=0) as filler:  # take every byte that is left
        with pytest.raises(OSError, match="No space left"):
            while True:
                filler.write(b"\0" * 4096)
    record = {"status": "failed", "error": "RuntimeError: the run's own error", "run_id": "r",
              "config": {"big": "x" * 50_000}}
    write_final_results(path, record, RuntimeError("the run's own error"))
    saved = json.loads(path.read_text())
    assert saved["status"] == "failed" and saved["error"] == "RuntimeError: the run's own error"
    assert "No space left" in saved["results_write_error"] and "config" not in saved
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler", "results.json"]  # no temp file
    completed = {"status": "completed", "error": None, "run_id": "r", "config": {"big": "x" * 50_000}}
    with pytest.raises(OSError, match="No space left"):  # a completed run whose record can't be saved has failed
        write_final_results(path, completed, None)
    saved = json.loads(path.read_text())
    assert saved["status"] == "failed" and "could not write results.json" in saved["error"]


def _fit_once(make_cfg, extra=(), epochs=2):
    from compresslab.pipeline import run_experiment

    cfg = make_cfg(["teacher=none", f"student.epochs={epochs}", *extra])
    return cfg, run_experiment(cfg)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_last_checkpoint_names_the_file_and_the_way_out(make_cfg, damage):
    from compresslab.pipeline import run_experiment

    cfg, _ = _fit_once(make_cfg)
    last = Path(cfg.paths.run_dir) / "checkpoints" / "student" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(CheckpointError) as err:
        run_experiment(cfg)
    message = str(err.value)
    assert str(last) in message and ("truncated" in message if damage == "truncated" else "empty" in message)
    assert "resume=false" in message
    record = json.loads((Path(cfg.paths.run_dir) / "results.json").read_text())
    assert record["status"] == "failed" and str(last) in record["error"]


def test_rerunning_a_completed_run_keeps_its_fit_time(make_cfg):
    from compresslab.pipeline import run_experiment

    # 6 full digits epochs: long enough (about 0.6 s on an idle core; 2 took 0.1999 s) that a re-run reporting its own
    # near-zero resume time instead of the fit's would fall outside rel=0.5
    cfg, first = _fit_once(make_cfg, ["trainer.limit_train_batches=null"], epochs=6)
    again = run_experiment(cfg)
    assert again["student"]["resumed_from"] and first["student"]["train_time_s"] > 0.2
    assert again["student"]["train_time_s"] == pytest.approx(first["student"]["train_time_s"], rel=0.5)


def test_files_are_created_with_the_umask_mode(make_cfg):
    import os
    import stat

    old = os.umask(0o022)
    try:
        cfg, record = _fit_once(make_cfg, ["teacher=convnet", "teacher.epochs=1"])
    finally:
        os.umask(old)
    run_dir = Path(cfg.paths.run_dir)
    paths = [run_dir / "results.json", Path(record["student"]["artifact"]), Path(record["teacher"]["artifact"]),
             run_dir / "checkpoints" / "student" / "last.ckpt"]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in paths} == {oct(0o644)}


def test_the_report_skips_a_record_that_is_not_utf8(tmp_path, capsys):
    from compresslab.cli import report_main

    for job, body in [("0", json.dumps({"status": "completed", "axes": {"student": "a"},
                                        "student": {"acc_top1": 0.9}}).encode()), ("1", b"\xff\xfe{not utf-8")]:
        (tmp_path / job).mkdir()
        (tmp_path / job / "results.json").write_bytes(body)
    report_main([str(tmp_path), "--rows", "student", "--cols", "", "--no-plots"])
    captured = capsys.readouterr()
    assert "warning: skipped" in captured.err and str(tmp_path / "1" / "results.json") in captured.err
    assert "1 completed runs, 0 pruned by the search, 0 failed" in captured.out


@pytest.mark.slow
def test_kill_9_mid_fit_resumes_from_the_last_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from conftest import FAST, ROOT

    run_dir = tmp_path / "run"
    args = [*[o for o in FAST if not o.startswith("trainer.limit_train_batches")], "teacher=none",
            "student.epochs=8", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "compresslab.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "student" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "the fit never wrote last.ckpt"
    epoch_at_kill = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "running"
    out = _cli(["teacher=none", "student.epochs=8", f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed" and record["student"]["resumed_from"] == str(last)
    assert epoch_at_kill < 7 and record["student"]["epochs_run"] == 8
