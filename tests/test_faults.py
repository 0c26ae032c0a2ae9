"""Faults and crafted inputs of the second adversarial round (issue #24), kept as regression tests:
files that reach outside the run, diverged or empty training, model files that ask for huge models,
a teacher cache holding the wrong file, signals and exit codes, two processes in one run dir, and
bad records and arguments for the report and command-line tools."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from compresslab.artifact import DENSE_FORMAT, atomic_torch_save, load_model_file, read_payload, save_model_file
from compresslab.errors import CheckpointError, ConfigError, RunDirBusy, TrainingDiverged
from compresslab.models import build_model

MLP = {"_target_": "compresslab.models.MLP", "hidden": [16]}


def _mlp_file(path: Path, arch=MLP, classes: int = 10, meta=None, nan: bool = False) -> Path:
    model = build_model(arch, (1, 8, 8), classes)
    if nan:
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("nan")
    return save_model_file(path, model, arch, (1, 8, 8), classes, meta=meta)


# ---- 1. files never reach outside the run ---------------------------------------------------

def _onnx_with_external_weight(path: Path, location: str) -> Path:
    """A 64 -> 10 MatMul whose weight says its data is in the external file ``location``."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("W", TensorProto.FLOAT, [64, 10], [0.0] * 640)
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(640 * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "doctored", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["secret.bin", "../../../x"])
def test_onnx_external_data_is_refused_and_measure_skips_the_file(tmp_path, monkeypatch, capsys, location):
    from compresslab.cli import measure_main
    from compresslab.runtime.ort import OrtModel

    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.bin").write_bytes(os.urandom(640 * 4))  # what ORT read as the weight before the fix
    opened = []
    sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open"
                     and str(args[0]).endswith("secret.bin") else None)
    run = tmp_path / "sweep" / "0"
    (run / "artifacts").mkdir(parents=True)
    files = {row: _mlp_file(run / "artifacts" / f"{row}.pt") for row in ("reference", "student")}
    doctored = _onnx_with_external_weight(run / "artifacts" / "student.onnx", location)
    record = {"schema_version": 2, "status": "completed", "axes": {"student": "mlp", "seed": 0},
              "config": {"measure": {"backends": ["torch", "onnxruntime"], "latency_batch": 4}},
              "reference": {"artifact": str(files["reference"])},
              "student": {"artifact": str(files["student"]), "acc_top1": 0.5, "onnx": {"path": str(doctored)}}}
    (run / "results.json").write_text(json.dumps(record))

    with pytest.raises(CheckpointError, match=f"external file \\(location='{location}'\\)"):
        OrtModel(doctored)
    measure_main([str(tmp_path / "sweep"), "--rounds", "2", "--round-ms", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    assert f"not timed: {doctored}: tensor 'W' keeps its data in an external file" in out
    written = json.loads((run / "results.json").read_text())["measured_together"]
    assert written["student"]["latency_ms_b1"] > 0  # the .pt files were timed...
    assert "backends" not in written["student"] and "deployed_speedup" not in written["student"]  # ...the .onnx not
    assert written["session"]["backends"] == ["torch"]
    assert not [p for p in opened if Path(p).resolve() == (tmp_path / "secret.bin").resolve()]
    opened.clear()


# ---- 2. diverged or empty training is not `completed` ---------------------------------------

def test_a_diverged_fit_ends_failed_with_epoch_step_and_what_to_try(make_cfg):
    from compresslab.pipeline import run_experiment

    cfg = make_cfg(["teacher=none", "distill=none", "student.optimizer.lr=1e6", "student.epochs=2"])
    with pytest.raises(TrainingDiverged) as err:
        run_experiment(cfg)
    record = json.loads((Path(cfg.paths.run_dir) / "results.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("TrainingDiverged: training diverged")
    assert "at epoch 0, step " in str(err.value) and "lower learning rate" in str(err.value)
    assert not (Path(cfg.paths.run_dir) / "artifacts" / "student.pt").exists()


@pytest.mark.parametrize("override, key", [("trainer.limit_train_batches=0", "trainer.limit_train_batches"),
                                           ("trainer.limit_train_batches=0.0", "trainer.limit_train_batches"),
                                           ("+trainer.max_steps=0", "trainer.max_steps"),
                                           ("student.epochs=0", "student.epochs")])
def test_training_that_runs_no_step_is_refused_before_training(make_cfg, override, key):
    from compresslab.pipeline import run_experiment

    cfg = make_cfg([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_experiment(cfg)
    assert json.loads((Path(cfg.paths.run_dir) / "results.json").read_text())["status"] == "failed"
    assert not list(Path(cfg.paths.teacher_cache).glob("*.pt")) and not (Path(cfg.paths.run_dir) / "checkpoints").exists()


def test_the_step_guard_refuses_a_fit_without_steps_and_non_finite_weights():
    from compresslab.train_guard import FiniteTraining

    guard, trainer = FiniteTraining(), SimpleNamespace(global_step=0, current_epoch=3)
    with pytest.raises(TrainingDiverged, match="ran no training step"):
        guard.on_train_end(trainer, None)
    module = torch.nn.Linear(2, 2)
    guard.on_train_epoch_end(trainer, module)  # finite: nothing
    with torch.no_grad():
        module.bias[1] = float("inf")
    with pytest.raises(TrainingDiverged, match="weight 'bias' holds NaN or inf at the end of epoch 3"):
        guard.on_train_epoch_end(trainer, module)
    guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(2.3)}, None, 0)
    with pytest.raises(TrainingDiverged, match="the loss is nan at epoch 3, step 0 \\(batch 5"):
        guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(float("nan"))}, None, 5)


def test_a_teacher_checkpoint_with_nan_weights_is_refused_before_the_student_trains(make_cfg, tmp_path):
    from compresslab.pipeline import run_experiment

    arch = {"_target_": "compresslab.models.ConvNet"}
    model = build_model(arch, (1, 8, 8), 10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "nan_teacher.pt")
    cfg = make_cfg(["distill=kd", f"teacher.ckpt={tmp_path / 'nan_teacher.pt'}"])
    with pytest.raises(CheckpointError, match=f"1 of .* values of '{first}' are NaN or infinite"):
        run_experiment(cfg)
    assert not (Path(cfg.paths.run_dir) / "checkpoints").exists()  # the student never trained
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_model_file(_mlp_file(tmp_path / "nan.pt", nan=True))


# ---- 5. model files: accurate refusals, bounded cost ----------------------------------------

@pytest.mark.parametrize("fmt, extra", [(DENSE_FORMAT, {"state_dict": {}}),
                                        ("compresslab.sparse/1", {"layers": {"w": torch.zeros(10)}})])
@pytest.mark.parametrize("hidden", [[1_000_000, 1_000_000], [60_000, 60_000]])  # 4 TB; 14 GB
def test_a_spec_far_larger_than_the_file_is_refused_before_building(tmp_path, fmt, extra, hidden):
    path = tmp_path / "huge.pt"
    atomic_torch_save({"format": fmt, "arch": {"_target_": "compresslab.models.MLP", "hidden": hidden},
                       "input_shape": [1, 8, 8], "num_classes": 10, "meta": {}, **extra}, path)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="implies [0-9,]+ values .* refused before building it"):
        load_model_file(path)
    assert time.perf_counter() - start < 5  # nothing was allocated


def test_legacy_pickles_and_directories_get_their_own_message(tmp_path):
    import argparse

    torch.save({"format": DENSE_FORMAT, "x": argparse.Namespace(a=1)}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="cannot be loaded safely .*legacy \\(non-zip\\)") as err:
        read_payload(tmp_path / "legacy.pt")
    assert "truncated" not in str(err.value) and "weights_only=False" not in str(err.value)
    with pytest.raises(CheckpointError, match="is a directory, not a model file"):
        load_model_file(tmp_path)


# ---- 6. the teacher cache heals or explains -------------------------------------------------

def _cache_case(make_cfg, case: str):
    from compresslab.config_utils import arch_spec
    from compresslab.pipeline import build_datamodule
    from compresslab.teacher import META_KEYS, obtain_teacher, teacher_cache_path

    cfg = make_cfg([])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    path = teacher_cache_path(cfg)
    path.parent.mkdir(parents=True)
    meta = {k: 0.5 for k in META_KEYS}
    spec = arch_spec(cfg.teacher)
    if case in ("good", "half"):
        save_model_file(path, build_model(spec, (1, 8, 8), 10), spec, (1, 8, 8), 10, meta=meta)
        if case == "half":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "no_meta":
        model = build_model(spec, (1, 8, 8), 10)
        payload = {"format": DENSE_FORMAT, "arch": dict(spec), "input_shape": [1, 8, 8], "num_classes": 10,
                   "state_dict": model.state_dict()}
        atomic_torch_save(payload, path)
    elif case == "other_arch":
        _mlp_file(path, meta=meta)
    elif case == "other_classes":
        save_model_file(path, build_model(spec, (1, 8, 8), 7), spec, (1, 8, 8), 7, meta=meta)
    return lambda: obtain_teacher(cfg, dm, trainer_factory=None, log=lambda *_: None), path


@pytest.mark.parametrize("case, why", [("half", "is damaged"), ("no_meta", "lacks its training figures"),
                                       ("other_arch", "not the configured teacher: its arch is"),
                                       ("other_classes", "not the configured teacher: its num_classes is 7")])
def test_a_wrong_cached_teacher_says_which_file_to_delete(make_cfg, case, why):
    obtain, path = _cache_case(make_cfg, case)
    with pytest.raises(CheckpointError, match=why) as err:
        obtain()
    assert f"Delete {path} " in str(err.value)


def test_the_configured_cached_teacher_loads(make_cfg):
    obtain, path = _cache_case(make_cfg, "good")
    teacher, info = obtain()
    assert info["source"] == "cache" and info["acc_top1"] == 0.5 and not teacher.training


def test_a_damaged_teacher_last_ckpt_is_skipped_with_resume_false(make_cfg):
    from compresslab.pipeline import run_experiment
    from compresslab.teacher import teacher_cache_path

    cfg = make_cfg(["distill=kd"])
    work = teacher_cache_path(cfg).with_suffix(".work")
    work.mkdir(parents=True)
    (work / "last.ckpt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(CheckpointError, match="resume=false"):
        run_experiment(cfg)
    cfg = make_cfg(["distill=kd", "resume=false"])  # the advice works for the teacher too
    assert run_experiment(cfg)["status"] == "completed"
    assert teacher_cache_path(cfg).exists()


# ---- 7. exit codes and signals --------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_fails_the_run_exits_non_zero_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "compresslab.cli", "logger=none", "teacher=none", "distill=none",
           "student.epochs=1000", "trainer.enable_progress_bar=false", "trainer.limit_train_batches=2",
           "trainer.limit_val_batches=1", "trainer.enable_model_summary=false",
           f"hydra.run.dir={run}", f"paths.teacher_cache={tmp_path / 't'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run / "checkpoints" / "student" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    record = json.loads((run / "results.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("Interrupted: interrupted by SIGTERM")
    assert str(last) in record["error"] and f"hydra.run.dir={run}" in record["error"]


def test_sensitivity_exits_zero_and_refuses_bad_arguments(tmp_path, capsys):
    from compresslab.cli import measure_main, sensitivity_main

    path = _mlp_file(tmp_path / "mlp.pt")
    common = [str(path), "dataset=digits", f"paths.data_dir={tmp_path}", "--out", str(tmp_path / "s")]
    assert sensitivity_main(common + ["--sparsities", "0.5", "--max-batches", "1"]) is None  # console script: exit 0
    assert (tmp_path / "s").is_dir()
    for argv, message in [(["--sparsities", "abc"], "argument --sparsities: 'abc' is not a number"),
                          (["--sparsities", "0.5,1.5"], "argument --sparsities: '1.5' is out of range: must be [0, 1)"),
                          (["--sparsities", "nan"], "'nan' is out of range"),
                          (["--max-batches", "0"], "argument --max-batches: '0' is out of range: must be >= 1")]:
        with pytest.raises(SystemExit) as exit_:
            sensitivity_main(common + argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    for argv, message in [(["--rounds", "0"], "argument --rounds: '0' is out of range: must be >= 1"),
                          (["--round-ms", "0"], "argument --round-ms: '0' is out of range: must be > 0"),
                          (["--threads-bN", "0"], "argument --threads-bN: '0' is out of range")]:
        with pytest.raises(SystemExit) as exit_:
            measure_main([str(tmp_path), *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


# ---- 8. one run per run dir -----------------------------------------------------------------

def test_a_second_process_in_a_busy_run_dir_is_refused_and_a_killed_holder_frees_it(make_cfg, tmp_path):
    from compresslab.pipeline import run_experiment
    from compresslab.run_control import RunDirLock

    cfg = make_cfg([])
    run = Path(cfg.paths.run_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from compresslab.run_control import "
                               "RunDirLock; RunDirLock(sys.argv[1]).__enter__(); print('held', flush=True); "
                               "time.sleep(600)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"{run} is in use by another compresslab process \\(pid {holder.pid}\\)"):
            run_experiment(cfg)
        assert not (run / "results.json").exists()  # the holder's record is not overwritten
    finally:
        holder.kill()
        holder.wait()
    with RunDirLock(run):  # the OS released the killed holder's lock: no stale lock file to delete
        with pytest.raises(RunDirBusy):
            RunDirLock(run).__enter__()


# ---- 9. report and command-line tools on bad records and arguments --------------------------

def _write_record(root: Path, name: str, student: dict | str = None, text: str | None = None, **fields) -> Path:
    run = root / name
    run.mkdir(parents=True)
    record = {"schema_version": 2, "status": "completed", "axes": {"student": "mlp", "distill": "none", "seed": 0},
              "config": {"student": {"epochs": 1}}, "student": {"acc_top1": 0.9, "size_bytes": 1000}, **fields}
    if student is not None:
        record["student"] = student
    (run / "results.json").write_text(text if text is not None else json.dumps(record))
    return run / "results.json"


def test_report_skips_bad_records_naming_file_and_field(tmp_path, capsys):
    from compresslab.cli import report_main

    sweep = tmp_path / "sweep"
    _write_record(sweep, "0")
    bad = {
        "1": (_write_record(sweep, "1", axes="mlp/kd"), "axes is a str"),
        "2": (_write_record(sweep, "2", text=json.dumps({"schema_version": 2, "status": "completed", "axes": {
            "student": "mlp", "distill": "none", "seed": 1}, "student": {"acc_top1": 0.5}}).replace("0.5", "1e400")),
            "student.acc_top1 is inf"),
        "3": (_write_record(sweep, "3", student={"acc_top1": float("nan"), "size_bytes": 10}), "student.acc_top1 is nan"),
        "4": (_write_record(sweep, "4", student={"acc_top1": "0.99", "size_bytes": 10}), "student.acc_top1 is '0.99'"),
        "5": (_write_record(sweep, "5", schema_version=99), "schema_version is 99; this compresslab reads versions 1, 2, 3"),
        "6": (_write_record(sweep, "6", student={"acc_top1": 0.9, "latency_ms_bN": "fast"}), "student.latency_ms_bN"),
    }
    _write_record(sweep, "7", schema_version=3)
    report_main([str(sweep), "--cols", "", "--no-plots", "--out", str(tmp_path / "rep")])
    captured = capsys.readouterr()
    for path, field in bad.values():
        assert f"warning: skipped {path.resolve()}: {field}" in captured.err
    assert "2 completed runs, 0 pruned by the search, 0 failed" in captured.out
    assert "| mlp | **90.00 ± 0.00 (2)** |" in captured.out  # neither inf nor the NaN run in the cell
    with pytest.raises(SystemExit) as exit_:
        report_main([str(sweep), "--rows", "no_such_key", "--no-plots"])
    assert exit_.value.code == 2
    assert "argument --rows: no completed run has 'no_such_key' as an axis or config key" in capsys.readouterr().err


def test_tables_never_show_or_bold_an_infinite_cell():
    import pandas as pd

    from compresslab.track.tables import pivot

    frame = pd.DataFrame({"student": ["a", "b"], "acc_top1": [0.5, float("inf")]})
    mean, _, _, best = pivot(frame, "student", None, "acc_top1")
    assert pd.isna(mean.at["b", "acc_top1"]) and bool(best.at["a", "acc_top1"]) and not bool(best.at["b", "acc_top1"])
