"""The Lightning callback of the unstructured pruning methods
(:class:`~compresslab.compress.prune.unstructured.UnstructuredPruning`): it keeps the masks,
applies the method's schedule to ``pl_module.model`` and keeps pruned weights at exactly zero.
Its ``state_dict`` (masks, schedule position, rewind snapshot: plain tensors) is part of
Lightning's checkpoint, so a resumed run continues with the same masks.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from compresslab.compress.common import dense_state, hide_epoch_from_selection
from compresslab.compress.prune.common import ScheduleTicks, layer_table, log_scalars, log_table
from compresslab.compress.prune.masks import sparsity_of
from compresslab.errors import ConfigError

log = logging.getLogger(__name__)


class UnstructuredPruningCallback(ScheduleTicks):
    """Applies a :class:`UnstructuredPruning` method's schedule to ``pl_module.model``.

    The schedule is a list of (time, target sparsity) points in the method's unit
    (``epoch``: checked at each epoch start; ``step``: at each optimizer step). When a
    point is reached, new masks are computed from the current weights (never reviving a
    pruned weight), applied, and the method may react (lottery rewinding). Until the last
    point has been applied, epochs are not eligible as the val-selected checkpoint.
    """

    def __init__(self, method: "UnstructuredPruning") -> None:
        self.method = method
        self.masks: dict[str, torch.Tensor] = {}
        self.applied_t = -1
        self.target = 0.0
        self.done = False
        self.rewind_state: dict[str, torch.Tensor] | None = None
        self.last_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []
        self._model_id: int | None = None
        self._layers: dict[str, nn.Module] = {}

    @property
    def state_key(self) -> str:
        return f"compresslab.prune.{self.method.name}"

    # ---- checkpoint state (plain tensors and numbers only) ---------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: v.detach().cpu().clone() for k, v in self.masks.items()},
            "applied_t": int(self.applied_t),
            "target": float(self.target),
            "done": bool(self.done),
            "rewind_state": self.rewind_state,
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = {k: v.bool() for k, v in state_dict.get("masks", {}).items()}
        self.applied_t = int(state_dict.get("applied_t", -1))
        self.target = float(state_dict.get("target", 0.0))
        self.done = bool(state_dict.get("done", False))
        self.rewind_state = state_dict.get("rewind_state")
        self.history = list(state_dict.get("history", []))

    # ---- the student's prunable layers -----------------------------------
    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """Prunable layers of ``model`` (re-resolved if the student object was replaced)."""
        if self._model_id != id(model) or not self._layers:
            self._layers = self.method.prunable(model)
            self._model_id = id(model)
            missing = [n for n in self.masks if n not in self._layers]
            if missing:
                raise RuntimeError(
                    f"pruning masks refer to layers {missing[:3]} that the student (pl_module.model) no longer "
                    f"has; prunable layers now: {list(self._layers)[:8]}")
        return self._layers

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: m.weight for n, m in self.layers(model).items()}

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        """Zero every pruned weight of ``model``."""
        for name, w in self.weights(model).items():
            mask = self.masks.get(name)
            if mask is not None:
                if mask.device != w.device:
                    mask = self.masks[name] = mask.to(w.device)
                w.masked_fill_(~mask, 0.0)  # +0.0 (w * mask would leave -0.0 behind)

    # ---- hooks -------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.layers(pl_module.model):
            raise ConfigError(f"prune={self.method.name}: the student has no prunable conv/linear layer "
                              "(check prune.exclude / prune.include_classifier)")

    def on_train_start(self, trainer, pl_module) -> None:
        self.apply_masks(pl_module.model)  # after a resume: the restored masks

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        weights = self.weights(pl_module.model)
        self.method.add_penalty_grad(self, weights)
        for name, w in weights.items():
            mask = self.masks.get(name)
            if mask is not None and w.grad is not None:
                w.grad.masked_fill_(~mask.to(w.grad.device), 0.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.apply_masks(pl_module.model)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        log_scalars(trainer, {"prune/sparsity": sparsity_of(self.weights(pl_module.model)),
                              "prune/target": self.target})
        if not self.done and self.method.select_after_pruning:
            hide_epoch_from_selection(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.last_state = dense_state(pl_module.model.state_dict())
        log_table(trainer, "prune/layer_sparsity", layer_table(pl_module.model, self.layers(pl_module.model)))

    # ---- schedule ------------------------------------------------------------
    def _tick(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        self.method.before_point(self, trainer, pl_module, t)
        points = self.method.points()
        due = [(p, s) for p, s in points if self.applied_t < p <= t]
        if not due:
            return
        p, target = due[-1]
        model = pl_module.model
        weights = self.weights(model)
        self.masks = self.method.compute_masks(weights, target, self.masks)
        self.apply_masks(model)
        self.applied_t, self.target = p, float(target)
        self.done = p >= points[-1][0]
        measured = sparsity_of(weights)
        self.history.append({"t": int(p), "target": float(target), "sparsity": measured})
        log.info("prune=%s: %s %d -> sparsity %.4f (target %.4f)", self.method.name, self.method.unit, p,
                 measured, target)
        self.method.after_point(self, trainer, pl_module, p)
