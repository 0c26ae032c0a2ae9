"""Sweepers and launchers: Optuna (single objective; more in test_search.py), submitit (local), the SLURM preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from compresslab.cluster import compose_launcher, sbatch_parameters, sbatch_preview

from conftest import FAST


def test_slurm_preset_generates_the_requested_resources():
    launcher = compose_launcher(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                                 "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90"])
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["nodes"] == 2 and launcher["tasks_per_node"] == 4 and launcher["gpus_per_node"] == 4
    assert launcher["max_num_timeout"] == 3  # requeued on preemption/timeout; the run resumes from last.ckpt
    params = sbatch_parameters(launcher)
    assert params["ntasks_per_node"] == 4 and params["time"] == 90 and params["mem"] == "64GB"
    script = sbatch_preview(launcher)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --signal=USR2@120"):
        assert line in script
    assert "srun" in script and "python -m compresslab.cli" in script


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "compresslab.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})


@pytest.mark.slow
def test_optuna_sweep_of_two_trials_reports_its_best(tmp_path):
    sweep = tmp_path / "optuna"
    out = _cli(["-m", "hydra/sweeper=optuna_tpe", "hydra.sweeper.n_trials=2", "hydra/sweeper/pruner=none", *FAST,
                "teacher=none", f"hydra.sweep.dir={sweep}",
                f"paths.teacher_cache={tmp_path / 'teachers'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    accs = [json.loads(p.read_text())["student"]["acc_top1"] for p in sweep.rglob("results.json")]
    assert len(accs) == 2
    assert best["best_value"] == pytest.approx(max(accs))
    assert set(best["best_params"]) == {"student.optimizer.lr", "student.optimizer.weight_decay"}
    assert "best trial" in out.stdout
    assert (sweep / "optuna.db").exists()  # the study persists in the sweep dir


@pytest.mark.slow
def test_submitit_local_multirun_completes(tmp_path):
    sweep = tmp_path / "submitit"
    out = _cli(["-m", "hydra/launcher=submitit_local", "seed=0,1", *FAST, f"hydra.sweep.dir={sweep}",
                f"paths.teacher_cache={tmp_path / 'teachers'}", "hydra.launcher.timeout_min=10"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert [r["status"] for r in records] == ["completed", "completed"]
    assert sorted(r["axes"]["seed"] for r in records) == [0, 1]
    assert list((sweep / ".submitit").iterdir())  # ran through submitit's executor
    # concurrent jobs defer their latency (measure.defer=auto); the sweep measures them together at its end
    assert all(r["student"]["latency_deferred"] for r in records)
    assert len({r["measured_together"]["session"]["id"] for r in records}) == 1
