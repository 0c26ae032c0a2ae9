"""Tracking as config (issue #28): loggers and callbacks groups, the W&B model artifact and the
teacher's, a multirun's shared W&B group."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compresslab.errors import ConfigError
from compresslab.pipeline import run_experiment
from compresslab.track.loggers import config_callbacks

from conftest import FAST


def offline_records(run_dir: Path):
    """The protobuf records of a run dir's offline W&B run: the ``.wandb`` file is a LevelDB-style log
    (7-byte header, 32 KiB blocks of records: crc32, length, type, data), read here because wandb >= 0.20
    has no Python reader (its core is written in Go)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/*.wandb")
    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and buf:  # FULL or LAST: one record complete
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_csv_logger_writes_curves_and_early_stopping_stops_the_fit(make_cfg):
    cfg = make_cfg([o for o in FAST if not o.startswith("logger")] + [
        "logger=csv", "teacher=none", "student.epochs=5", "callbacks=early_stopping",
        "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=1.0"], fast=False)
    record = run_experiment(cfg)
    assert record["status"] == "completed"
    # min_delta=1.0: no epoch after the first improves val/acc enough, so patience 1 stops after epoch 2 of 5
    assert record["student"]["epochs_run"] == 2
    rows = list(csv.DictReader((Path(cfg.paths.run_dir) / "csv" / "metrics.csv").open()))
    val = {int(r["epoch"]): float(r["val/acc"]) for r in rows if r.get("val/acc")}
    assert sorted(val) == [0, 1]
    assert max(val.values()) == pytest.approx(record["student"]["val_acc_top1"])  # the val-selected epoch's
    assert not (Path(cfg.paths.run_dir) / "wandb").exists()


def test_lr_monitor_without_a_logger_is_refused(make_cfg):
    with pytest.raises(ConfigError, match="logger=none"):
        config_callbacks(make_cfg(["callbacks=[lr_monitor,rich_progress_bar]"]))
    names = [type(c).__name__ for c in config_callbacks(make_cfg(["callbacks=[lr_monitor,rich_progress_bar]",
                                                                  "logger=csv"]))]
    assert names == ["LearningRateMonitor", "RichProgressBar"]


@pytest.mark.slow
def test_multirun_logs_model_artifacts_in_one_wandb_group(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *[o for o in FAST if not o.startswith("logger")], "logger=wandb", "student.optimizer.lr=0.003,0.002",
            f"hydra.sweep.dir={sweep}", f"paths.teacher_cache={tmp_path / 'teachers'}"]
    out = subprocess.run([sys.executable, "-m", "compresslab.cli", *args], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    teacher_logged = []
    for job in ("0", "1"):
        record = json.loads((sweep / job / "results.json").read_text())
        records = list(offline_records(sweep / job))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_group, run.job_type) == ("sweep", "sweep")  # the sweep dir's name
        artifacts = {r.artifact.name: r.artifact for r in records if r.WhichOneof("record_type") == "artifact"}
        (model,) = [a for name, a in artifacts.items() if name.startswith("student-")]
        assert model.type == "model"
        assert {e.path for e in model.manifest.contents} == {"artifacts/student.pt", "results.json"}
        meta = json.loads(model.metadata)
        assert meta["acc_top1"] == record["student"]["acc_top1"]
        assert meta["teacher_artifact"].startswith("teacher-digits-")
        teacher_logged += [a.name for name, a in artifacts.items() if name.startswith("teacher-")]
    assert len(teacher_logged) == 1  # by the job that trained it; the other used the cached file
