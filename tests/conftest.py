"""Shared test fixtures: composing the real config tree with fast settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

#: Under pytest-xdist (``make test`` runs ``-n 2``) every worker, and every process a test starts
#: (they inherit os.environ), uses one intra-op thread: two workers with one thread per core each
#: on CI's 2 cores would oversubscribe them, and torch's spinning OpenMP threads then wait on each
#: other's time slices (many times slower than one thread). The variables reach the children (and
#: the OpenMP runtime, when torch is first imported after this); set_num_threads this worker.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

#: Overrides that make a run take seconds: 1 epoch, few batches, short latency loops.
FAST = [
    "logger=none",
    "teacher.epochs=1",
    "student.epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "measure.latency_warmup=1",
    "measure.latency_round_ms=1",
    "measure.latency_rounds=2",
    "measure.latency_batch=8",
    "measure.fresh_process=false",  # tests that need it turn it back on (it adds a Python start-up)
]


def compose_config(tmp_path: Path, overrides: list[str] = (), fast: bool = True):
    """Compose conf/config.yaml with run dir, teacher cache and data dir inside ``tmp_path``."""
    GlobalHydra.instance().clear()
    base = [
        f"paths.run_dir={tmp_path / 'run'}",
        f"paths.teacher_cache={tmp_path / 'teachers'}",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=base + (FAST if fast else []) + list(overrides))


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(overrides)`` -> a fast composed config writing under this test's tmp dir."""
    return lambda overrides=(), fast=True: compose_config(tmp_path, overrides, fast)

