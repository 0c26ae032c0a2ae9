"""The ``compresslab`` command: a Hydra app over ``conf/`` that runs one experiment per job."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = os.environ.get("COMPRESSLAB_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run the composed experiment; returns its objective (see ``objective`` in conf/config.yaml)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from compresslab.pipeline import run_experiment

    try:
        record = run_experiment(cfg)
    except Exception:
        # In a sweep a failed job is recorded (results.json, W&B) and the others go on;
        # the SweepSummary callback lists it at the end. A single run fails loudly.
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            logging.getLogger(__name__).exception("job failed; the sweep goes on")
            return None
        raise
    return objective_value(record, cfg.objective)


def objective_value(record: dict, objective: DictConfig) -> float | None:
    """The number a sweeper optimizes: ``objective.metric`` of the student, or ``objective.penalty``
    when the artifact breaks the size or latency budget."""
    student = record.get("student") or {}
    if objective.get("max_size_bytes") is not None and student.get("size_bytes", 0) > objective.max_size_bytes:
        return float(objective.penalty)
    if objective.get("max_latency_ms") is not None and student.get("latency_ms_bN", 0) > objective.max_latency_ms:
        return float(objective.penalty)
    value = student.get(objective.metric)
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
