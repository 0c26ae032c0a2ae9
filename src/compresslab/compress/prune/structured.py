"""Structured (filter/channel) pruning that physically removes channels, with Torch-Pruning's
dependency graph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023).
``prune=slimming`` (:mod:`compresslab.compress.prune.slimming`) builds on this module.

Removing output channels of a conv also removes the matching BN entries, the next
layer's input channels, and — through the dependency graph — keeps residual additions
and concatenations consistent (coupled channels are removed together). Importance:
``l1``/``l2`` filter norms (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017),
``bn_scale`` (|γ|, Liu et al., "Learning Efficient Convolutional Networks through Network
Slimming", ICCV 2017), ``taylor`` (first-order |w·∂L/∂w|, Molchanov et al., "Importance
Estimation for Neural Network Pruning", CVPR 2019) or ``random``; ranked per layer or
globally. One-shot or iterative (``steps`` > 1, evenly spaced between ``start`` and ``end``
with fine-tuning in between). The classifier's outputs and the ``exclude``d layers are never
pruned.

The pruning step and the importances are :mod:`compresslab.compress.prune.channels`. Saving: the
artifact is the original arch spec plus the pruned state dict (``compresslab.structured/1``,
:mod:`compresslab.compress.codecs.structured`), rebuilt by
:func:`~compresslab.compress.structure.resize_to_state_dict` (every parameter/buffer gets its saved
shape before ``load_state_dict``). The same resize runs as a load-state-dict pre-hook on the
student during training, so resuming from ``last.ckpt`` (pruned shapes) works.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.codecs.structured import structured_payload
from compresslab.compress.common import CONV_LINEAR, dense_state, hide_epoch_from_selection
from compresslab.compress.prune.channels import (
    GRADIENT_IMPORTANCES,
    GroupNormRegularizer,
    cumulative_ratios,
    prune_channels,
    step_ratio,
)
from compresslab.compress.prune.common import (
    ScheduleTicks,
    check_schedule_fits,
    log_scalars,
    log_table,
    write_table,
)
from compresslab.compress.prune.options import StructuredOptions
from compresslab.compress.structure import rebuildable_from_spec, resize_to_state_dict, structure_of
from compresslab.errors import ConfigError
from compresslab.measure import count_macs

log = logging.getLogger(__name__)


def _swap_optimizer_params(trainer: pl.Trainer, before: Mapping[str, nn.Parameter], model: nn.Module) -> None:
    """Point the optimizers at the student's new (pruned) parameters; their moments restart."""
    after = dict(model.named_parameters())
    remap = {id(p): after[n] for n, p in before.items() if n in after and after[n] is not p}
    if not remap:
        return
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            group["params"] = [remap.get(id(p), p) for p in group["params"]]
        for p in [p for p in opt.state if id(p) in remap]:
            del opt.state[p]


class StructuredPruningCallback(ScheduleTicks):
    """Runs the channel-pruning steps of a :class:`StructuredPruning` on ``pl_module.model``."""

    def __init__(self, method: "StructuredPruning") -> None:
        self.method = method
        self.steps_done = 0
        self.done = False
        self.history: list[dict] = []
        self.last_state: dict[str, torch.Tensor] | None = None
        self._hooked: set[int] = set()
        self.hook_handles: list = []
        self._regularizer = None

    @property
    def state_key(self) -> str:
        return f"compresslab.prune.{self.method.name}"

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "done": self.done, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict.get("steps_done", 0))
        self.done = bool(state_dict.get("done", False))
        self.history = list(state_dict.get("history", []))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = pl_module.model
        if trainer.world_size > 1:
            raise ConfigError("prune=structured changes parameter shapes during the fit, which DDP does not "
                              "allow; run it on one device")
        if id(model) not in self._hooked:  # a resumed or reloaded checkpoint may hold pruned shapes
            self.hook_handles.append(model.register_load_state_dict_pre_hook(
                lambda module, state_dict, prefix, *args: resize_to_state_dict(module, state_dict, prefix)))
            self._hooked.add(id(model))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        log_scalars(trainer, {"prune/params": sum(p.numel() for p in pl_module.model.parameters()),
                              "prune/steps_done": self.steps_done})
        if not self.done and self.method.select_after_pruning:
            hide_epoch_from_selection(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """The method's sparsity regularizer (group_norm, slimming) until its last pruning step."""
        if not self.method.regularizes() or not self.method.regularize_now(self.done):
            return
        model = pl_module.model
        if self._regularizer is None or self._regularizer.model is not model:
            self._regularizer = self.method.make_regularizer(model, self.method.example.to(
                next(model.parameters()).device))
        self._regularizer()

    def on_train_end(self, trainer, pl_module) -> None:
        self.last_state = dense_state(pl_module.model.state_dict())
        log_table(trainer, "prune/channels", self.method.channel_table(pl_module.model))

    def _batches(self, trainer: pl.Trainer, device) -> list:
        if self.method.importance not in GRADIENT_IMPORTANCES:
            return []
        dm = getattr(trainer, "datamodule", None)
        loader = dm.train_dataloader() if dm is not None else trainer.train_dataloader
        out = []
        for i, (x, y) in enumerate(loader):
            if i >= self.method.taylor_batches:
                break
            out.append((x.to(device), y.to(device)))
        return out

    def _tick(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        points = self.method.points()
        while self.steps_done < len(points) and points[self.steps_done] <= t:
            i = self.steps_done
            model = pl_module.model
            device = next(model.parameters()).device
            before = dict(model.named_parameters())
            n_before = sum(p.numel() for p in before.values())
            self.method.prune_step(model, self.method.example.to(device), step_ratio(self.method.cumulative, i),
                                   self._batches(trainer, device))
            self._regularizer = None  # shapes changed: a regularizer is rebuilt on the pruned graph
            _swap_optimizer_params(trainer, before, model)
            n_after = sum(p.numel() for p in model.parameters())
            if n_after == n_before:
                log.warning("prune=%s: step %d removed no channel (importance=%s gave no ranking, e.g. all-equal "
                            "BN scales, or every layer is excluded)", self.method.name, i + 1, self.method.importance)
            self.steps_done = i + 1
            self.done = self.steps_done == len(points)
            self.history.append({"t": int(t), "step": i + 1, "channels_removed": self.method.cumulative[i],
                                 "params": n_after})
            log.info("prune=%s: step %d/%d at %s %d: params %d -> %d", self.method.name, i + 1, len(points),
                     self.method.unit, t, n_before, n_after)


class StructuredPruning(CompressionMethod):
    """Channel pruning that makes the student physically smaller (see the module docstring).

    ``ratio``: fraction of channels removed (per layer, or over all layers with
    ``scope=global``, where no layer loses more than ``max_layer_ratio``). ``steps``: 1 for
    one-shot at ``start``; k > 1 for k steps evenly spaced from ``start`` to ``end`` (in
    ``unit``s), each removing an equal share of the original channels, fine-tuning in
    between. ``exclude``: module-name patterns never pruned (the classifier never is).
    ``round_to``: keep channel counts multiples of this. ``taylor_batches``: batches whose
    gradients score channels for ``importance=taylor``.
    """

    options = StructuredOptions

    def __init__(
        self,
        name: str,
        ratio: float = 0.5,
        importance: str = "l1",
        scope: str = "layer",
        steps: int = 1,
        start: int = 2,
        end: int | None = None,
        unit: str = "epoch",
        exclude: Sequence[str] = (),
        max_layer_ratio: float = 0.9,
        round_to: int | None = None,
        taylor_batches: int = 4,
        group_norm: Mapping[str, Any] | None = None,
        select_after_pruning: bool = True,
        epochs: int | None = None,
    ) -> None:
        super().__init__(name)
        self.ratio, self.importance, self.scope = float(ratio), importance, scope
        if importance == "lamp" and self.scope != "global":
            raise ConfigError("prune.importance=lamp ranks channels exactly like l2 within one layer (its score is "
                              "monotone in the squared norm); it chooses layer-wise ratios only with one global "
                              "ranking: set prune.scope=global")
        gn = dict(group_norm or {})
        self.gn_reg = float(gn.get("reg", 1e-4))
        self.gn_alpha = float(gn.get("alpha", 4.0))
        self.steps, self.unit = int(steps), unit
        self.start = int(start)
        self.end = int(end) if end is not None else self.start + self.steps - 1
        if self.end < self.start or (self.steps > 1 and self.end - self.start < self.steps - 1):
            raise ConfigError(f"prune.start={start}, prune.end={end} cannot hold prune.steps={steps} pruning steps")
        self.exclude = list(exclude or [])
        self.max_layer_ratio = float(max_layer_ratio)
        self.round_to = None if round_to is None else int(round_to)
        self.taylor_batches = int(taylor_batches)
        self.select_after_pruning = bool(select_after_pruning)
        self.epochs = None if epochs is None else int(epochs)
        self.cumulative = cumulative_ratios(self.ratio, self.steps)
        check_schedule_fits(self.points()[-1], self.unit, self.epochs, f"prune={self.name}")
        self.example: torch.Tensor | None = None
        self._callback: StructuredPruningCallback | None = None
        self._before: dict[str, list[int]] = {}
        self._report: dict[str, Any] = {}
        self._table: list[dict] = []

    # ---- overridable pieces (prune=slimming) ---------------------------------------
    def prune_step(self, model: nn.Module, example: torch.Tensor, ratio: float, batches: Sequence) -> None:
        """Remove ``ratio`` of the current channels of ``model`` in place."""
        prune_channels(model, example, ratio, self.importance, self.scope, self.exclude, self.max_layer_ratio,
                       self.round_to, batches)

    def regularizes(self) -> bool:
        """Whether a sparsity regularizer runs on the gradients before the pruning steps."""
        return self.importance == "group_norm" and self.gn_reg > 0

    def regularize_now(self, schedule_done: bool) -> bool:
        """Whether the regularizer runs now (default: until the last pruning step)."""
        return not schedule_done

    def make_regularizer(self, model: nn.Module, example: torch.Tensor):
        """A callable adding the regularizer's gradient to ``model``'s parameters."""
        return GroupNormRegularizer(model, example, self.gn_reg, self.gn_alpha, self.exclude)

    def points(self) -> list[int]:
        """Times (in ``unit``) of the pruning steps."""
        if self.steps == 1:
            return [self.start]
        span = self.end - self.start
        return [self.start + round(i * span / (self.steps - 1)) for i in range(self.steps)]

    def channel_table(self, model: nn.Module) -> list[dict]:
        """Per conv/linear layer: weight shape and output channels before/after, fraction kept."""
        rows = []
        for name, module in model.named_modules():
            if not isinstance(module, CONV_LINEAR):
                continue
            shape = list(module.weight.shape)
            before = self._before.get(name, shape)
            rows.append({"layer": name, "type": type(module).__name__,
                         "shape_before": "x".join(map(str, before)), "shape_after": "x".join(map(str, shape)),
                         "out_before": before[0], "out_after": shape[0], "kept": shape[0] / max(1, before[0]),
                         "params_before": int(torch.Size(before).numel()), "params_after": module.weight.numel()})
        return rows

    # ---- CompressionMethod hooks -------------------------------------------------
    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        self.example = datamodule.example_batch(1)
        self._before = {n: list(m.weight.shape) for n, m in student.named_modules() if isinstance(m, CONV_LINEAR)}
        self._report = {"prune_method": self.name, "params_before": sum(p.numel() for p in student.parameters()),
                        "macs_before": count_macs(student, self.example)}
        return student

    def callbacks(self) -> list[Callback]:
        self._callback = StructuredPruningCallback(self)
        return [self._callback]

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        cb = self._callback
        selected = "val-best"
        if cb is not None and cb.last_state is not None:
            current = student.state_dict()
            if any(tuple(current[k].shape) != tuple(v.shape) for k, v in cb.last_state.items() if k in current):
                log.warning("prune=%s: the val-selected weights predate the last pruning step; using the last "
                            "epoch's pruned weights instead", self.name)
                resize_to_state_dict(student, cb.last_state)
                student.load_state_dict(cb.last_state)
                selected = "last (val-best epoch preceded the end of the pruning schedule)"
        if cb is not None:
            for handle in cb.hook_handles:
                handle.remove()
            cb.hook_handles.clear()
            cb._hooked.clear()
        example = self.example if self.example is not None else datamodule.example_batch(1)
        params_after = sum(p.numel() for p in student.parameters())
        macs_after = count_macs(student, example)
        self._table = self.channel_table(student)
        self._report.update({
            "prune_ratio": self.ratio,
            "importance": self.importance,
            "params_after": params_after,
            "params_reduction": 1.0 - params_after / max(1, self._report.get("params_before", params_after)),
            "macs_after": macs_after,
            "macs_ratio": self._report.get("macs_before", macs_after) / max(1, macs_after),
            "selected_weights": selected,
            "pruning_steps_done": cb.steps_done if cb is not None else 0,
            "schedule_done": bool(cb.done) if cb is not None else False,
            "channels": {r["layer"]: [r["out_before"], r["out_after"]] for r in self._table},
        })
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict | None:
        structure = structure_of(student, context)  # the low-rank plan, if lowrank ran first
        if not rebuildable_from_spec(student, {**context, "structure": structure}, same_shapes=False):
            raise ConfigError(f"prune={self.name}: the student's modules no longer match its arch spec (another "
                              "method changed the structure); structured pruning cannot be saved as spec + weights")
        run_dir = context.get("run_dir")
        if run_dir is not None:
            paths = write_table(self._table, Path(run_dir) / "pruning" / "channels",
                                title=f"prune={self.name}: channels per layer")
            self._report["channel_table"] = paths["csv"]
        return structured_payload(student, context["arch"], context["input_shape"], context["num_classes"],
                                  meta={"prune": self.name, "ratio": self.ratio, "importance": self.importance},
                                  structure=structure)

    def report(self) -> dict[str, Any]:
        return dict(self._report)
