"""Every paper preset composes and runs one batch on generated data in the preset's real format."""

from __future__ import annotations

from pathlib import Path

import pytest

from compresslab.pipeline import run_experiment

from conftest import CONF_DIR
from test_vision_data import write_cifar100, write_imagefolder, write_mnist

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if "\npaper:" in p.read_text())

#: data writer and preset-specific overrides that shrink the run to one batch
SETUP = {
    "repdistiller_cifar100": (lambda root: write_cifar100(root, n_train=40, n_test=8),
                              ["dataset.verify_integrity=false", "dataset.batch_size=8", "dataset.num_workers=0"]),
    "hinton_mnist": (lambda root: write_mnist(root, n_train=40, n_test=8), ["dataset.num_workers=0"]),
    "han_pruning_lenet": (lambda root: write_mnist(root, n_train=40, n_test=8),
                          ["dataset.num_workers=0", "student.epochs=2", "prune.start=0", "prune.end=1"]),
    "deep_compression_lenet": (lambda root: write_mnist(root, n_train=40, n_test=8),
                               ["dataset.num_workers=0", "student.epochs=2", "prune.start=0", "prune.end=1"]),
    "jacob_int8": (lambda root: write_imagefolder(root, n_train=6, n_test=2),
                   ["dataset.num_workers=0", "dataset.batch_size=4", "dataset.eval_batch_size=4",
                    "dataset.image_size=32", "dataset.val_fraction=0.2",
                    "quant.lower=false"]),  # skip the inductor int8 lowering of ResNet-50 (minutes on CPU)
}

ONE_BATCH = ["teacher.epochs=1", "student.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
             "trainer.limit_test_batches=1", "measure.latency_batch=2"]


def test_every_preset_has_a_one_batch_setup_and_paper_numbers(make_cfg):
    assert set(PRESETS) == set(SETUP)
    for name in PRESETS:
        cfg = make_cfg([f"experiment={name}"])
        assert cfg.paper.citation and cfg.paper.results and cfg.paper.report.rows


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_one_batch(name, make_cfg, tmp_path):
    write, overrides = SETUP[name]
    write(tmp_path / "data")
    cfg = make_cfg([f"experiment={name}", *ONE_BATCH, *overrides])
    record = run_experiment(cfg)
    assert record["status"] == "completed"
    assert Path(record["student"]["artifact"]).exists()
    assert record["config"]["paper"]["results"]


@pytest.mark.slow
def test_showcase_sweep_ends_with_the_ablation_table_and_pareto_plots(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import FAST

    sweep = tmp_path / "showcase"
    out = subprocess.run(
        [sys.executable, "-m", "compresslab.cli", "-m", "experiment=showcase", *FAST, "student.epochs=3",
         "++prune.start=0", "++prune.end=1", f"hydra.sweep.dir={sweep}", f"paths.teacher_cache={tmp_path / 't'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900, env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    assert len(records) == 8 and all(r["status"] == "completed" for r in records)
    combos = {(r["axes"]["distill"], r["axes"]["prune"], r["axes"]["quant"]) for r in records}
    assert len(combos) == 8
    assert "### acc_top1" in out.stdout and "| distill+quant |" in out.stdout and "kd/ptq_int8" in out.stdout
    assert (sweep / "acc_vs_size.png").exists() and (sweep / "acc_vs_speedup.png").exists()
    # the showcase defers per-job latency and times all eight jobs together at its end
    assert len({r["measured_together"]["session"]["id"] for r in records}) == 1
    assert "latency figures: 8 runs measured together in one process" in out.stdout
