"""End-to-end runs through the composed config and through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException
from pytorch_lightning.callbacks import Callback

from compresslab.artifact import load_model_file
from compresslab.errors import CheckpointError, ConfigError, DatasetNotFoundError
from compresslab.measure import evaluate_accuracy
from compresslab.pipeline import build_datamodule, run_experiment
from compresslab.axes import AXES

from conftest import CONF_DIR, FAST, ROOT

METRIC_KEYS = {
    "acc_top1", "acc_top1_last", "params", "params_nonzero", "sparsity", "macs", "size_bytes", "size_ratio",
    "latency_ms_b1", "latency_ms_b1_p90", "latency_ms_bN", "latency_batch", "speedup", "threads", "device",
    "train_time_s",
}


def test_digits_run_writes_every_results_key_with_measured_numbers(make_cfg, tmp_path):
    cfg = make_cfg()
    record = run_experiment(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["error"] is None
    assert set(on_disk["axes"]) == set(AXES) | {"seed"}
    assert on_disk["axes"]["dataset"] == "digits" and on_disk["axes"]["student"] == "lenet5"
    assert on_disk["config"]["student"]["epochs"] == 1
    for row in ("teacher", "student"):
        assert METRIC_KEYS <= set(on_disk[row]), METRIC_KEYS - set(on_disk[row])
    assert {"size_bytes", "latency_ms_b1", "latency_ms_bN"} <= set(on_disk["reference"])
    assert on_disk["versions"]["torch"] == torch.__version__.split("+")[0] or on_disk["versions"]["torch"]

    student = on_disk["student"]
    artifact = Path(student["artifact"])
    assert student["size_bytes"] == artifact.stat().st_size
    model = load_model_file(artifact)
    assert student["params"] == sum(p.numel() for p in model.parameters())
    dm = build_datamodule(cfg)
    dm.setup()
    assert student["acc_top1"] == pytest.approx(evaluate_accuracy(model, dm.test_dataloader()))
    assert student["latency_batch"] == 8
    assert student["size_ratio"] == pytest.approx(on_disk["reference"]["size_bytes"] / student["size_bytes"])
    assert record["student"]["acc_top1"] == student["acc_top1"]


def test_saved_student_reloads_in_a_fresh_process_with_identical_outputs(make_cfg, tmp_path):
    record = run_experiment(make_cfg())
    artifact = record["student"]["artifact"]
    x = torch.randn(5, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    expected = load_model_file(artifact)(x)
    script = (
        "import sys, torch; from compresslab.artifact import load_model_file;"
        "m = load_model_file(sys.argv[1]); x = torch.load(sys.argv[2], weights_only=True);"
        "torch.save(m(x).detach(), sys.argv[3])"
    )
    subprocess.run([sys.executable, "-c", script, artifact, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True)
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), expected.detach())


def test_mnist1d_run_uses_1d_models(make_cfg):
    record = run_experiment(make_cfg(["dataset=mnist1d"]))
    assert record["axes"]["dataset"] == "mnist1d"
    assert record["axes"]["teacher"] == "cnn1d" and record["axes"]["student"] == "cnn1d_small"
    assert record["student"]["params"] < record["teacher"]["params"]


class _CrashAt(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


class _RecordStart(Callback):
    def __init__(self):
        self.start_epoch = None

    def on_train_start(self, trainer, pl_module):
        self.start_epoch = trainer.current_epoch


def test_crashed_run_resumes_from_last_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(["student.epochs=3"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(cfg, extra_callbacks=[_CrashAt(2)])
    failed = json.loads((tmp_path / "run" / "results.json").read_text())
    assert failed["status"] == "failed" and "simulated crash" in failed["error"]
    last = tmp_path / "run" / "checkpoints" / "student" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1  # epochs 0 and 1 finished

    recorder = _RecordStart()
    record = run_experiment(cfg, extra_callbacks=[recorder])
    assert recorder.start_epoch == 2
    assert record["status"] == "completed"
    assert record["student"]["resumed_from"] == str(last)
    assert record["student"]["epochs_run"] == 3


def test_missing_dataset_fails_early_and_leaves_failed_results(make_cfg, tmp_path):
    cfg = make_cfg(["dataset=mnist"])
    with pytest.raises(DatasetNotFoundError) as err:
        run_experiment(cfg)
    assert "dataset.download=true" in str(err.value) and str(tmp_path / "data") in str(err.value)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and "dataset.download=true" in record["error"]
    assert not (tmp_path / "teachers").exists()  # nothing trained


@pytest.mark.parametrize("override, valid", [("dataset=nope", "digits"), ("student=nope", "resnet20"),
                                             ("teacher=nope", "convnet")])
def test_unknown_names_list_the_valid_ones(make_cfg, override, valid):
    with pytest.raises(MissingConfigException) as err:
        make_cfg([override])
    assert "Available options" in str(err.value) and valid in str(err.value)


def test_image_model_on_sequence_data_fails_before_training(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="1-D"):
        run_experiment(make_cfg(["dataset=mnist1d", "student=resnet20"]))
    assert not (tmp_path / "teachers").exists()


def test_teacher_checkpoint_is_loaded_instead_of_trained(make_cfg, tmp_path):
    first = run_experiment(make_cfg())
    cached = Path(first["teacher"]["artifact"])
    assert first["teacher"]["source"] == "trained"
    again = run_experiment(make_cfg())
    assert again["teacher"]["source"] == "cache"
    loaded = run_experiment(make_cfg([f"teacher.ckpt={cached}"]))
    assert loaded["teacher"]["source"] == "checkpoint"
    assert loaded["teacher"]["acc_top1"] == pytest.approx(first["teacher"]["acc_top1"])
    with pytest.raises(CheckpointError, match="does not exist"):
        run_experiment(make_cfg(["teacher.ckpt=/nonexistent/teacher.pt"]))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_pickled_code_is_refused(make_cfg, tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil()}, bad)
    with pytest.raises(CheckpointError, match="safely"):
        run_experiment(make_cfg([f"teacher.ckpt={bad}"]))


_CACHE_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
from functools import partial
from pathlib import Path
from hydra.utils import instantiate
from conftest import compose_config
from compresslab.pipeline import build_datamodule
from compresslab.teacher import obtain_teacher
cfg = compose_config(Path(sys.argv[1]), ["teacher.epochs=2"])
dm = build_datamodule(cfg); dm.setup()
model, info = obtain_teacher(cfg, dm, partial(instantiate, cfg.trainer), log=lambda *_: None)
print("SOURCE", info["source"])
"""


def test_concurrent_jobs_train_a_shared_teacher_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", _CACHE_SCRIPT, str(tmp_path), str(ROOT / "tests")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    sources = sorted(line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("SOURCE"))
    assert sources == ["cache", "trained"]
    files = sorted(p.name for p in (tmp_path / "teachers").iterdir())
    assert len([f for f in files if f.endswith(".pt")]) == 1
    assert not [f for f in files if f.endswith(".tmp") or f.endswith(".work")]


@pytest.mark.slow
def test_cli_runs_default_experiment_and_logs_wandb_offline(tmp_path):
    run_dir = tmp_path / "cli_run"
    cmd = [sys.executable, "-m", "compresslab.cli", *[o for o in FAST if not o.startswith("logger")],
           "logger=wandb", f"hydra.run.dir={run_dir}", f"paths.teacher_cache={tmp_path / 'teachers'}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed"
    assert record["config"]["logger"]["wandb"]["_target_"].endswith("make_wandb_logger")
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    assert "results.json" in out.stdout


@pytest.mark.slow
def test_cli_failure_exits_nonzero_with_failed_results(tmp_path):
    run_dir = tmp_path / "cli_fail"
    cmd = [sys.executable, "-m", "compresslab.cli", "dataset=cifar10", f"dataset.root={tmp_path / 'none'}",
           "logger=none", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode != 0
    assert "dataset.download=true" in out.stderr + out.stdout
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"


def test_method_reports_go_under_their_axis_and_a_key_two_axes_write_is_refused():
    from compresslab.track.results import add_method_reports

    student = {"acc_top1": 0.9}
    add_method_reports(student, {"prune": {"prune_method": "agp", "sparsity_prunable": 0.5},
                                 "quant": {"quant_method": "ptq_int8"}})
    assert student["prune"] == {"prune_method": "agp", "sparsity_prunable": 0.5}
    assert student["quant"] == {"quant_method": "ptq_int8"}
    assert student["sparsity_prunable"] == 0.5 and student["acc_top1"] == 0.9
    with pytest.raises(RuntimeError, match="student.bits is reported by quant and by axis prune"):
        add_method_reports({}, {"prune": {"bits": 8}, "quant": {"bits": 4}})
    with pytest.raises(RuntimeError, match="student.acc_top1 is reported by prune and by the shared metrics"):
        add_method_reports({"acc_top1": 0.9}, {"prune": {"acc_top1": 0.1}})
    with pytest.raises(RuntimeError, match="student.fuse is reported by fuse and by an axis's block"):
        add_method_reports({}, {"fuse": {"fuse": "bn"}})  # would have replaced the block student.fuse


def test_a_new_axis_needs_only_its_config_group_and_one_constant(tmp_path, monkeypatch):
    """docs/architecture.md, "Adding an axis": a config group plus its name in
    ``compresslab.axes.COMPRESSION_AXES`` is all a new compression axis needs; the run applies
    its method, labels the run with it and reports it under ``student.<axis>``."""
    import shutil

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from compresslab import axes

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "prune2").mkdir()
    (conf / "prune2" / "none.yaml").write_text("name: none\n")
    shutil.copy(conf / "prune" / "magnitude.yaml", conf / "prune2" / "magnitude.yaml")
    defaults = (conf / "config.yaml").read_text()
    (conf / "config.yaml").write_text(defaults.replace("  - prune: none\n", "  - prune: none\n  - prune2: none\n", 1))
    monkeypatch.setattr(axes, "COMPRESSION_AXES", (*axes.COMPRESSION_AXES, "prune2"))
    monkeypatch.setattr(axes, "AXES", (*axes.AXES, "prune2"))

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.run_dir={tmp_path / 'run'}", f"paths.teacher_cache={tmp_path / 't'}",
                                           "teacher=none", "distill=none", "prune2=magnitude", *FAST, "prune2.at=1",
                                           "student.epochs=3"])
    record = run_experiment(cfg)
    assert record["axes"]["prune2"] == "magnitude" and record["axes"]["prune"] == "none"
    assert record["student"]["prune2"]["prune_method"] == "magnitude"
    assert record["student"]["sparsity"] > 0.5
