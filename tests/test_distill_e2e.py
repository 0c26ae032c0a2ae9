"""Every ``distill=<method>`` config end to end through ``run_experiment`` (a few batches)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compresslab.artifact import load_model_file
from compresslab.pipeline import run_experiment

from conftest import CONF_DIR, compose_config

METHODS = sorted(p.stem for p in (CONF_DIR / "distill").glob("*.yaml") if p.stem != "none")
QUICK = [
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "measure.latency_warmup=0",
    "measure.latency_round_ms=1",
    "measure.latency_batch=2",
]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """One teacher cache for the whole file: the teacher is trained once per dataset."""
    return tmp_path_factory.mktemp("teachers")


def short_stages(method: str) -> list[str]:
    """Overrides that cut a method's initialisation stages (``init_epochs``, 30 in AB/FSP/FT) to one
    epoch: the stage still runs as its own fit, on the same 2 batches, without 30 epochs of overhead."""
    spec = yaml.safe_load((CONF_DIR / "distill" / f"{method}.yaml").read_text())
    return [f"distill.feature_losses.{name}.init_epochs=1"
            for name, item in (spec.get("feature_losses") or {}).items() if (item or {}).get("init_epochs")]


def run(tmp_path: Path, teachers: Path, overrides: list[str]) -> dict:
    cfg = compose_config(tmp_path, [*QUICK, f"paths.teacher_cache={teachers}", *overrides])
    return run_experiment(cfg)


def test_every_catalogue_method_has_a_config():
    expected = {"kd", "fitnet", "at", "sp", "pkt", "rkd", "crd", "dkd", "kd_ls", "kd_at", "kd_fitnet"}
    assert expected <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_end_to_end_on_digits(method, tmp_path, teachers):
    record = run(tmp_path, teachers, [f"distill={method}", *short_stages(method)])
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["axes"]["distill"] == method
    assert record["axes"]["teacher"] == "convnet" and record["axes"]["student"] == "lenet5"
    assert 0.0 <= on_disk["student"]["acc_top1"] <= 1.0
    # the saved student is the plain student network
    student = load_model_file(on_disk["student"]["artifact"])
    assert sum(p.numel() for p in student.parameters()) == on_disk["student"]["params"]
    # the student checkpoint holds no copy of the teacher and loads with weights_only=True
    state = torch.load(tmp_path / "run" / "checkpoints" / "student" / "last.ckpt", weights_only=True)["state_dict"]
    assert sum(k.startswith("model.") for k in state) == len(student.state_dict())
    assert all(k.startswith(("model.", "adapters.", "feature_losses.", "init_done")) for k in state)


@pytest.mark.parametrize("method", ["fitnet", "crd"])
def test_mnist1d_with_teacher_output_cache(method, tmp_path, teachers):
    record = run(tmp_path, teachers, ["dataset=mnist1d", f"distill={method}", "distill.cache_teacher_outputs=true",
                                      "student.epochs=2"])
    assert record["status"] == "completed" and record["axes"]["distill"] == method
    assert record["axes"]["teacher"] == "cnn1d" and record["axes"]["student"] == "cnn1d_small"
