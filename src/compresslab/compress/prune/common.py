"""Shared pieces of the pruning methods: schedules, per-layer sparsity tables
(Distiller-style), MAC counts of the nonzero weights, logging. Which layers are pruned is
:func:`compresslab.compress.common.select_layers` with ``types=CONV_LINEAR``."""

from __future__ import annotations

import abc
import csv
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.common import CONV_LINEAR
from compresslab.errors import ConfigError


def layer_table(model: nn.Module, prunable: Iterable[str] = ()) -> list[dict]:
    """One row per conv/linear layer: shape, params, nonzeros, sparsity, whether it is pruned."""
    prunable = set(prunable)
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, CONV_LINEAR):
            continue
        w = module.weight.detach()
        nnz = int(torch.count_nonzero(w))
        rows.append({
            "layer": name, "type": type(module).__name__, "shape": "x".join(str(s) for s in w.shape),
            "params": w.numel(), "nonzero": nnz, "sparsity": 1.0 - nnz / max(1, w.numel()),
            "pruned": name in prunable,
        })
    return rows


def write_table(rows: Sequence[Mapping[str, Any]], path_stem: Path, title: str = "") -> dict[str, str]:
    """Write ``rows`` as ``<stem>.csv`` and a markdown table ``<stem>.md``; returns both paths."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0].keys()) if rows else []
    csv_path, md_path = path_stem.with_suffix(".csv"), path_stem.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return {"csv": str(csv_path), "md": str(md_path)}


@torch.no_grad()
def nonzero_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one forward pass if only nonzero conv/linear weights were multiplied
    (what a sparse kernel would do; dense kernels still do :func:`compresslab.measure.count_macs`)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        nnz = int(torch.count_nonzero(module.weight))
        if isinstance(module, nn.Linear):
            positions = output.numel() // output.shape[-1] // max(1, output.shape[0])
        else:
            positions = output[0, 0].numel()
        total += nnz * positions

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, CONV_LINEAR)]
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(total)


def schedule_points(start: int, end: int, frequency: int) -> list[int]:
    """Pruning times ``start, start+Δ, ...`` up to ``end`` (``end`` is always one of them)."""
    if end < start:
        raise ConfigError(f"prune.end ({end}) must be >= prune.start ({start})")
    points = list(range(int(start), int(end) + 1, int(frequency)))
    if points[-1] != end:
        points.append(int(end))
    return points


def check_schedule_fits(last_point: float, unit: str, epochs: int | None, what: str) -> None:
    """Fail before training when the schedule would not finish with fine-tuning left."""
    if epochs is None or unit != "epoch":
        return
    if last_point >= epochs:
        raise ConfigError(
            f"{what} ends at epoch {last_point:g} but the student trains for student.epochs={epochs} "
            f"(epochs 0..{epochs - 1}); the last pruning step must come before the last epoch so the "
            "network is fine-tuned. Lower the prune schedule (e.g. prune.end=...) or raise student.epochs.")


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Send scalars to the trainer's loggers (not through the LightningModule)."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


def log_table(trainer: pl.Trainer, key: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Log ``rows`` as a W&B table when a WandbLogger is attached (no-op otherwise)."""
    if not rows:
        return
    for logger in trainer.loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        cols = list(rows[0].keys())
        table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
        logger.experiment.log({key: table})


class ScheduleTicks(Callback, abc.ABC):
    """Calls ``self._tick(trainer, pl_module, t)`` at each schedule unit of ``self.method.unit``:
    the start of every epoch (``t`` = epoch) or of every training batch (``t`` = optimizer step)."""

    method: Any

    @abc.abstractmethod
    def _tick(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        """Update the pruning state at schedule time ``t``."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.method.unit == "epoch":
            self._tick(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.method.unit == "step":
            self._tick(trainer, pl_module, trainer.global_step)
