"""DDP with 2 CPU processes (gloo) inside a Hydra multirun of 2 jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from compresslab.distributed import scale_lr, world_size


def test_lr_scaling_rules():
    assert scale_lr(0.1, 4, "none") == 0.1
    assert scale_lr(0.1, 4, "linear") == pytest.approx(0.4)
    assert scale_lr(0.1, 4, "sqrt") == pytest.approx(0.2)
    assert world_size({"devices": 2, "num_nodes": 3}) == 6
    assert world_size({"devices": [0, 1], "num_nodes": 1}) == 2


def test_scaled_lr_reaches_the_optimizer(make_cfg):
    from compresslab.config_utils import recipe_kwargs

    cfg = make_cfg(["trainer=ddp", "trainer.devices=4", "scaling.lr=linear", "student.optimizer.lr=0.01"])
    optimizer = recipe_kwargs(cfg.student, cfg)["optimizer"]
    assert optimizer.keywords["lr"] == pytest.approx(0.04)


@pytest.mark.slow
def test_ddp_jobs_in_a_multirun_share_one_run_dir_each(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "compresslab.cli", "-m", "seed=0,1", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "logger=wandb", "teacher.epochs=1", "student.epochs=1",
           "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
           "measure.latency_round_ms=1", f"hydra.sweep.dir={sweep}", f"paths.teacher_cache={tmp_path / 'teachers'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    job_dirs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in job_dirs] == ["0", "1"]  # no extra dirs from re-launched sweeps
    for job in job_dirs:
        record = json.loads((job / "results.json").read_text())
        assert record["status"] == "completed"
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1
        rank1_log = (job / "cli_rank1.log").read_text()
        assert "GLOBAL_RANK: 1" in rank1_log and "MEMBER: 2/2" in rank1_log
    assert len(list(sweep.rglob("results.json"))) == 2
