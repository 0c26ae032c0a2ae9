"""Shared pieces of the pruning methods: which weights are prunable, per-layer sparsity tables
(Distiller-style), MAC counts, and the rule that keeps val-selection after the pruning schedule."""

from __future__ import annotations

import abc
import csv
import fnmatch
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.nn.modules.conv import _ConvNd

from compresslab.errors import ConfigError

#: Layer types whose ``weight`` is prunable.
PRUNABLE_TYPES = (nn.Linear, _ConvNd)
SCOPES = ("layer", "global")


def classifier_name(model: nn.Module) -> str | None:
    """Name of the output layer: the last ``nn.Linear`` registered (else the last conv)."""
    last_linear = last_any = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_linear = name
        if isinstance(module, PRUNABLE_TYPES):
            last_any = name
    return last_linear if last_linear is not None else last_any


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def prunable_layers(model: nn.Module, include_classifier: bool = False,
                    exclude: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Conv/linear layers of ``model`` whose weights are pruned, by module name.

    The classifier (see :func:`classifier_name`) is left out unless ``include_classifier``;
    ``exclude`` holds module-name patterns (``fnmatch``, e.g. ``"conv1"``, ``"layer1.*"``).
    """
    head = None if include_classifier else classifier_name(model)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, PRUNABLE_TYPES) and n != head and not _matches(n, exclude)}


def check_scope(scope: str) -> str:
    """Validate a ``scope`` option (``layer`` or ``global``)."""
    if scope not in SCOPES:
        raise ConfigError(f"prune.scope must be one of {SCOPES}, got {scope!r}")
    return scope


def check_fraction(key: str, value: float, high_inclusive: bool = False) -> float:
    """Validate a sparsity/ratio in [0, 1)."""
    value = float(value)
    ok = 0.0 <= value <= 1.0 if high_inclusive else 0.0 <= value < 1.0
    if not ok:
        raise ConfigError(f"prune.{key} must be in [0, 1{']' if high_inclusive else ')'}, got {value}")
    return value


def layer_table(model: nn.Module, prunable: Iterable[str] = ()) -> list[dict]:
    """One row per conv/linear layer: shape, params, nonzeros, sparsity, whether it is pruned."""
    prunable = set(prunable)
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
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

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
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
    if frequency <= 0:
        raise ConfigError(f"prune.frequency must be a positive integer, got {frequency}")
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


def hide_unfinished_epoch(trainer: pl.Trainer) -> None:
    """Make this epoch ineligible as the val-selected ("best") checkpoint.

    Runs in a callback's ``on_train_epoch_end``, before Lightning's ``ModelCheckpoint``
    (checkpoint callbacks always run last): the monitored value in
    ``trainer.callback_metrics`` becomes -inf, so the best checkpoint is chosen among the
    epochs after the pruning schedule finished (the logged metric is not changed).
    """
    for cb in trainer.checkpoint_callbacks:
        key = getattr(cb, "monitor", None)
        if key and key in trainer.callback_metrics:
            ref = trainer.callback_metrics[key]
            trainer.callback_metrics[key] = torch.tensor(-math.inf, dtype=torch.float32,
                                                         device=getattr(ref, "device", "cpu"))


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


def rebuildable_from_spec(student: nn.Module, context: Mapping[str, Any], same_shapes: bool = True) -> bool:
    """Whether the model rebuilt from ``context["arch"]`` (and ``context["structure"]``, a
    :func:`~compresslab.compress.quantization.layers.structure_of` description, when given)
    has the student's state-dict keys (and shapes), i.e. an artifact of arch spec + weights
    can rebuild it (an earlier method such as a low-rank factorization may have changed the
    module structure)."""
    from compresslab.compress.quantization.layers import build_structure

    ref = build_structure(context["arch"], context["input_shape"], context["num_classes"],
                          context.get("structure")).state_dict()
    mine = student.state_dict()
    if list(ref) != list(mine):
        return False
    return not same_shapes or all(tuple(ref[k].shape) == tuple(mine[k].shape) for k in ref)


def state_to_cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a state dict's tensors."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


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
