"""Weights & Biases through Lightning's WandbLogger: offline by default, finished in a ``finally``.

- :func:`make_wandb_logger` is the ``logger=wandb`` node's factory (``conf/logger/wandb.yaml``): the jobs
  of a multirun share a ``group`` (the sweep dir's name) and a ``job_type``; ``define_metric`` keeps
  the best ``val/acc`` in the summary.
- :func:`log_final` puts the final metrics in the summary and logs the run's model as an Artifact
  (type ``model``: student.pt, its .onnx files, results.json, plots; axes and key metrics as metadata),
  with the teacher as its own artifact, used as an input of every run that distilled from it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

METRIC_ROWS = ("teacher", "reference", "student")
#: student figures copied into the model artifact's metadata
KEY_METRICS = ("acc_top1", "val_acc_top1", "size_bytes", "size_ratio", "params", "params_nonzero", "sparsity",
               "macs", "latency_ms_b1", "latency_ms_bN", "speedup")


def make_wandb_logger(cfg: DictConfig, run_dir: Path, axes: Mapping[str, Any], *, project: str = "compresslab",
                      entity: str | None = None, mode: str = "offline", group: str | None = None,
                      job_type: str | None = None, tags: Sequence[str] = (), log_artifacts: bool = True):
    """A WandbLogger for this run (offline unless ``mode=online``). ``group``/``job_type`` default to the
    sweep dir's name and ``sweep`` in a multirun (``run`` otherwise); a requeued or re-run job continues its
    W&B run (:func:`wandb_run_id`)."""
    from pytorch_lightning.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    sweep_dir = multirun_dir()
    run_id = wandb_run_id(run_dir, resume=bool(cfg.get("resume", True)))
    all_tags = list(tags or []) + [f"{k}={v}" for k, v in axes.items() if v not in (None, "none")]
    logger = WandbLogger(
        project=project, entity=entity, name=f"{axes.get('dataset')}-{axes.get('student')}-{Path(run_dir).name}",
        save_dir=str(run_dir), offline=str(mode) == "offline", mode=str(mode),
        group=group or (sweep_dir.name if sweep_dir else None),
        job_type=job_type or ("sweep" if sweep_dir else "run"),
        tags=all_tags[:64], config=OmegaConf.to_container(cfg, resolve=True), id=run_id,
        resume="allow",
    )
    logger.log_artifacts = bool(log_artifacts)
    from compresslab.distributed import is_rank_zero

    if is_rank_zero():  # the summary's val/acc is the best epoch's, not the last
        logger.experiment.define_metric("val/acc", summary="max")
        logger.experiment.define_metric("val/loss", summary="min")
    return logger


def multirun_dir() -> Path | None:
    """The sweep dir of the multirun this job belongs to, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir)


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


def wandb_logger_of(loggers) -> Any:
    """The WandbLogger among a run's loggers (a list, one logger or None), else None."""
    from pytorch_lightning.loggers import WandbLogger

    items = loggers if isinstance(loggers, (list, tuple)) else [loggers]
    return next((lg for lg in items if isinstance(lg, WandbLogger)), None)


def flatten_metrics(record: Mapping[str, Any]) -> dict:
    """``{"student/acc_top1": ..., "teacher/params": ...}`` for the W&B run summary."""
    flat = {}
    for row in METRIC_ROWS:
        metrics = record.get(row) or {}
        for key, value in metrics.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                flat[f"{row}/{key}"] = value
    flat["status"] = record.get("status")
    return flat


def log_final(loggers, record: Mapping[str, Any]) -> None:
    """Put the final metrics in the run summary and a teacher/reference/student ``wandb.Table``, and log
    the model and teacher artifacts."""
    logger = wandb_logger_of(loggers)
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
    if getattr(logger, "log_artifacts", True):
        log_model_artifact(run, record)


def artifact_name(text: str) -> str:
    """``text`` with the characters W&B refuses in artifact names replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:120] or "model"


def model_files(run_dir: Path) -> list[Path]:
    """What a run's model artifact holds: student.pt, the student's ONNX files, results.json, the plots."""
    run_dir = Path(run_dir)
    artifacts = run_dir / "artifacts"
    files = [artifacts / "student.pt", *sorted(artifacts.glob("student*.onnx*")), run_dir / "results.json",
             *sorted(run_dir.glob("*.png"))]
    return [f for f in files if f.is_file()]


def log_model_artifact(run, record: Mapping[str, Any]) -> Any:
    """Log the run's model as a W&B Artifact (type ``model``), its axes and key metrics as metadata.

    The teacher file (cached or given) is its own ``model`` artifact: online it is an input of every run
    that used it (``use_artifact``; W&B keeps one version per content digest, so the runs of one teacher
    link the same version). W&B refuses ``use_artifact`` offline: there the run that trained the teacher
    logs it, and every run's model artifact names it (``teacher_artifact`` and its digest in the metadata).
    """
    import wandb

    run_dir = Path(record["run_dir"])
    axes = dict(record.get("axes") or {})
    student = record.get("student") or {}
    metadata = {"axes": axes, "status": record.get("status"),
                **{k: student[k] for k in KEY_METRICS if isinstance(student.get(k), (int, float))}}
    teacher = record.get("teacher") or {}
    if teacher.get("file") and Path(teacher["file"]).is_file():
        used = wandb.Artifact(artifact_name(f"teacher-{axes.get('dataset')}-{Path(teacher['file']).stem}"),
                              type="model", metadata={"role": "teacher", "acc_top1": teacher.get("acc_top1"),
                                                      "arch": axes.get("teacher"), "source": teacher.get("source")})
        used.add_file(str(teacher["file"]), name="teacher.pt")
        metadata.update(teacher_artifact=used.name, teacher_digest=used.digest)
        if not run.offline:
            run.use_artifact(used)
        elif teacher.get("source") == "trained":
            run.log_artifact(used)
    artifact = wandb.Artifact(artifact_name(f"student-{axes.get('dataset')}-{axes.get('student')}-{run.id}"),
                              type="model", metadata=metadata)
    for path in model_files(run_dir):
        artifact.add_file(str(path), name=str(path.relative_to(run_dir)))
    return run.log_artifact(artifact, aliases=["latest", str(record.get("status"))])


def finish(loggers, failed: bool) -> None:
    """Close the W&B run (safe to call for no logger); marks failed runs with exit code 1.

    It is called in a ``finally``: an error closing the run (W&B's service process already gone,
    as when SLURM signals a requeued job's processes) is logged, not raised, so that it never
    replaces the error or exit that is under way (a requeued job must exit, not return).
    """
    if wandb_logger_of(loggers) is None:
        return
    import wandb

    if wandb.run is not None:
        try:
            wandb.finish(exit_code=1 if failed else 0)
        except Exception as exc:  # noqa: BLE001
            logging.getLogger(__name__).warning("could not close the W&B run: %s: %s", type(exc).__name__, exc)
