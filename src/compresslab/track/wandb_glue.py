"""Weights & Biases through Lightning's WandbLogger: offline by default, finished in a ``finally``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from compresslab.axes import COMPRESSION_AXES

METRIC_ROWS = ("teacher", "reference", "student")


def make_logger(cfg: DictConfig, run_dir: Path, axes: Mapping[str, Any]):
    """A WandbLogger for ``logger=wandb`` (offline unless ``logger.mode=online``), else None."""
    lcfg = cfg.logger
    if lcfg.name == "none":
        return None
    if lcfg.name != "wandb":
        from compresslab.errors import ConfigError

        raise ConfigError(f"Unknown logger '{lcfg.name}'; choose logger=wandb or logger=none")
    from pytorch_lightning.loggers import WandbLogger

    mode = str(lcfg.mode or "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    run_id = wandb_run_id(run_dir, resume=bool(cfg.get("resume", True)))
    tags = list(lcfg.tags or []) + [f"{k}={v}" for k, v in axes.items() if v not in (None, "none")]
    return WandbLogger(
        project=lcfg.project,
        entity=lcfg.entity,
        name=f"{axes.get('dataset')}-{axes.get('student')}-{Path(run_dir).name}",
        save_dir=str(run_dir),
        offline=mode == "offline",
        mode=mode,
        group=lcfg.group,
        job_type=lcfg.job_type,
        tags=tags[:64],
        config=OmegaConf.to_container(cfg, resolve=True),
        id=run_id,
        resume="allow",  # a requeued or re-run job continues its W&B run instead of starting a second one
    )


def wandb_run_id(run_dir: Path, resume: bool = True) -> str:
    """The W&B run id of the run in ``run_dir``: the one its first start chose (kept in
    ``<run dir>/wandb/run_id``) when resuming, else a new one. Global rank 0 writes it."""
    import secrets

    from compresslab.distributed import is_rank_zero

    path = Path(run_dir) / "wandb" / "run_id"
    if resume and path.exists():
        saved = path.read_text(encoding="utf-8").strip()
        if saved:
            return saved
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], like W&B's own ids
    if is_rank_zero():
        from compresslab.files import atomic_write_bytes

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (run_id + "\n").encode())
    return run_id


#: the student's nested blocks whose plain values a summary carries too (``student/prune/sparsity_prunable``):
#: each compression axis's report (schema v3 keeps method keys only there) and ``encodings``
NESTED_BLOCKS = (*COMPRESSION_AXES, "encodings")


def _scalars(prefix: str, metrics: Mapping[str, Any], flat: dict) -> None:
    for key, value in metrics.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            flat[f"{prefix}/{key}"] = value


def flatten_metrics(record: Mapping[str, Any]) -> dict:
    """``{"student/acc_top1": ..., "teacher/params": ..., "student/quant/backend": ...}`` for the W&B
    run summary (:func:`compresslab.track.wandb_records.load_wandb_records` nests them back)."""
    flat: dict = {}
    for row in METRIC_ROWS:
        metrics = record.get(row) or {}
        _scalars(row, metrics, flat)
        for block in NESTED_BLOCKS:
            if isinstance(metrics.get(block), Mapping):
                _scalars(f"{row}/{block}", metrics[block], flat)
    flat["status"] = record.get("status")
    return flat


def log_final(logger, record: Mapping[str, Any]) -> None:
    """Put the final metrics in the run summary and a teacher/reference/student ``wandb.Table``."""
    if logger is None:
        return
    import wandb

    run = logger.experiment
    run.summary.update(flatten_metrics(record))
    keys = sorted({k for row in METRIC_ROWS for k in (record.get(row) or {})
                   if isinstance((record.get(row) or {}).get(k), (int, float, str, bool))})
    table = wandb.Table(columns=["model", *keys])
    for row in METRIC_ROWS:
        metrics = record.get(row) or {}
        if metrics:
            table.add_data(row, *[metrics.get(k) for k in keys])
    run.log({"results": table})


def finish(logger, failed: bool) -> None:
    """Close the W&B run (safe to call for no logger); marks failed runs with exit code 1.

    It is called in a ``finally``: an error closing the run (W&B's service process already gone,
    as when SLURM signals a requeued job's processes) is logged, not raised, so that it never
    replaces the error or exit that is under way (a requeued job must exit, not return).
    """
    if logger is None:
        return
    import wandb

    if wandb.run is not None:
        try:
            wandb.finish(exit_code=1 if failed else 0)
        except Exception as exc:  # noqa: BLE001
            logging.getLogger(__name__).warning("could not close the W&B run: %s: %s", type(exc).__name__, exc)
