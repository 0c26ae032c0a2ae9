"""Structured (filter/channel) pruning that physically removes channels, with Torch-Pruning's
dependency graph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023).
``prune=slimming`` (:mod:`compresslab.compress.pruning.slimming`) builds on this module.

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

Saving: the artifact is the original arch spec plus the pruned state dict
(format ``compresslab.structured/1``). :func:`resize_to_state_dict` rebuilds the pruned
network by giving every parameter/buffer the saved shape (and fixing ``in_channels`` /
``out_channels`` / ``num_features`` ...) before ``load_state_dict`` — no pickled code, and
it reloads in a fresh process. The same resize runs as a load-state-dict pre-hook on the
student during training, so resuming from ``last.ckpt`` (pruned shapes) works.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from compresslab.compress.base import CompressionMethod
from compresslab.compress.pruning.common import (
    ScheduleTicks,
    PRUNABLE_TYPES,
    _matches,
    check_fraction,
    check_schedule_fits,
    check_scope,
    classifier_name,
    hide_unfinished_epoch,
    log_scalars,
    log_table,
    rebuildable_from_spec,
    state_to_cpu,
    write_table,
)
from compresslab.errors import ConfigError
from compresslab.measure import count_macs
from compresslab.models import build_model

log = logging.getLogger(__name__)

STRUCTURED_FORMAT = "compresslab.structured/1"
IMPORTANCES = ("l1", "l2", "bn_scale", "taylor", "hessian", "lamp", "random", "group_norm")
#: importances scored from gradients of training batches
GRADIENT_IMPORTANCES = ("taylor", "hessian")


# ---- rebuilding a pruned network from its state dict ------------------------------
def _fix_attributes(module: nn.Module, old: Mapping[str, int]) -> None:
    """Update a resized layer's size attributes from its new parameter shapes."""
    if isinstance(module, _ConvNd):
        w = module.weight
        depthwise = old["groups"] > 1 and old["groups"] == old["in_channels"] == old["out_channels"]
        if module.transposed:
            module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
        elif depthwise:
            module.groups = module.in_channels = module.out_channels = w.shape[0]
        else:
            module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, _NormBase):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()


@torch.no_grad()
def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Give each parameter/buffer of ``model`` the shape it has in ``state_dict`` (keys with
    ``prefix``); values are left uninitialized for ``load_state_dict`` to fill. Returns the names
    of the modules that changed."""
    changed = []
    for mname, module in model.named_modules():
        base = prefix + (f"{mname}." if mname else "")
        old = {k: getattr(module, k, None) for k in ("groups", "in_channels", "out_channels")}
        touched = False
        for pname, p in list(module._parameters.items()):
            saved = state_dict.get(base + pname)
            if p is not None and saved is not None and tuple(saved.shape) != tuple(p.shape):
                setattr(module, pname, nn.Parameter(torch.empty(saved.shape, dtype=p.dtype, device=p.device),
                                                    requires_grad=p.requires_grad))
                touched = True
        for bname, b in list(module._buffers.items()):
            saved = state_dict.get(base + bname)
            if b is not None and saved is not None and tuple(saved.shape) != tuple(b.shape):
                module._buffers[bname] = torch.empty(saved.shape, dtype=b.dtype, device=b.device)
                touched = True
        if touched:
            _fix_attributes(module, old)
            changed.append(mname)
    return changed


def structured_payload(model: nn.Module, arch: Mapping[str, Any], input_shape: Sequence[int], num_classes: int,
                       meta: Mapping[str, Any] | None = None, structure: Mapping[str, Any] | None = None) -> dict:
    """Plain-data artifact of a channel-pruned model: original arch spec (plus the low-rank
    plan when the student was factorized first, see ``build_structure``) + pruned state dict."""
    return {
        "format": STRUCTURED_FORMAT,
        "arch": dict(arch),
        "input_shape": [int(v) for v in input_shape],
        "num_classes": int(num_classes),
        "structure": {k: v for k, v in dict(structure or {}).items() if k == "lowrank"},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }


def load_structured_payload(payload: Mapping[str, Any]) -> nn.Module:
    """Rebuild a channel-pruned model: build the arch (and its low-rank plan), resize to the
    saved shapes, load."""
    from compresslab.compress.quantization.layers import build_structure

    model = build_structure(payload["arch"], payload["input_shape"], payload["num_classes"], payload.get("structure"))
    resize_to_state_dict(model, payload["state_dict"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


# ---- one pruning step with torch-pruning ------------------------------------------
def _importance(kind: str):
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="first")
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="first")
    if kind == "bn_scale":
        return tp.importance.BNScaleImportance()
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    if kind == "hessian":
        return tp.importance.GroupHessianImportance()
    if kind == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if kind == "random":
        return tp.importance.RandomImportance()
    if kind == "group_norm":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    raise ConfigError(f"prune.importance must be one of {IMPORTANCES}, got {kind!r}")


def ignored_modules(model: nn.Module, exclude: Sequence[str] = ()) -> list[nn.Module]:
    """The classifier plus every module whose name matches an ``exclude`` pattern."""
    head = classifier_name(model)
    return [m for n, m in model.named_modules() if n and (n == head or _matches(n, exclude))]


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float,
    importance: str = "l1",
    scope: str = "layer",
    exclude: Sequence[str] = (),
    max_layer_ratio: float = 0.9,
    round_to: int | None = None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> nn.Module:
    """Remove the ``ratio`` fraction of channels of ``model`` (in place) with torch-pruning.

    ``batches`` feed the gradient importances: ``taylor`` (gradient of the summed cross-entropy)
    and ``hessian`` (per-sample squared gradients, their mean put in ``.grad``: the empirical
    Fisher diagonal). BN is in eval mode while scoring; the model is traced in eval mode, so BN
    statistics do not change.
    """
    import torch_pruning as tp

    if ratio <= 0:
        return model
    was_training = model.training
    model.eval()
    try:
        if importance in GRADIENT_IMPORTANCES:
            if not batches:
                raise ConfigError(f"prune.importance={importance} needs training batches")
            if importance == "taylor":
                model.zero_grad(set_to_none=True)
                for x, y in batches:
                    F.cross_entropy(model(x), y).backward()
            else:
                fisher_diagonal(model, batches)
        pruner = tp.pruner.MetaPruner(
            model, example, importance=_importance(importance), global_pruning=scope == "global",
            pruning_ratio=float(ratio), max_pruning_ratio=float(max_layer_ratio),
            ignored_layers=ignored_modules(model, exclude), round_to=round_to, iterative_steps=1,
        )
        pruner.step()
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    return model


def fisher_diagonal(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Put ``mean_n (∂L_n/∂θ)^2`` over the single samples of ``batches`` in every parameter's
    ``.grad`` (the empirical-Fisher approximation of the Hessian diagonal used by OBD scores);
    returns the number of samples. (torch-pruning's ``accumulate_grad`` keys its running sums
    inconsistently in 1.6 and keeps only the last sample, so the sum is taken here.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    n = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.detach() ** 2)
            n += 1
    for p, a in zip(params, acc):
        p.grad = a / max(1, n)
    return n


class GroupNormRegularizer:
    """DepGraph's group-level sparse training (Fang et al. 2023, Sec. 3.3), through torch-pruning's
    ``GroupNormPruner.regularize``: after a backward pass, ``grad += reg · γ_k · w`` on every weight of
    each coupled group, ``γ_k = 2^(alpha (I_max − I_k)/(I_max − I_min))`` with ``I_k`` the square root
    of the group's (mean-normalized) group norm. Rebuilt after each pruning step (new shapes)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, reg: float, alpha: float,
                 exclude: Sequence[str] = ()) -> None:
        import torch_pruning as tp

        self.model, self.alpha = model, float(alpha)
        was_training = model.training
        model.eval()
        try:
            self.pruner = tp.pruner.GroupNormPruner(model, example, importance=_importance("group_norm"),
                                                    reg=float(reg), ignored_layers=ignored_modules(model, exclude))
        finally:
            model.train(was_training)

    def __call__(self) -> None:
        self.pruner.regularize(self.model, alpha=2.0 ** self.alpha)


def cumulative_ratios(ratio: float, steps: int) -> list[float]:
    """Fraction of the original channels removed after each of ``steps`` equal steps."""
    return [ratio * (i + 1) / steps for i in range(steps)]


def step_ratio(cumulative: Sequence[float], i: int) -> float:
    """Ratio of the *current* channels to remove at step ``i`` to reach ``cumulative[i]``."""
    prev = cumulative[i - 1] if i > 0 else 0.0
    return 1.0 - (1.0 - cumulative[i]) / (1.0 - prev)


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
            hide_unfinished_epoch(trainer)

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
        self.last_state = state_to_cpu(pl_module.model.state_dict())
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
        self.ratio = check_fraction("ratio", ratio)
        if importance not in IMPORTANCES:
            raise ConfigError(f"prune.importance must be one of {IMPORTANCES}, got {importance!r}")
        self.importance = importance
        self.scope = check_scope(scope)
        if importance == "lamp" and self.scope != "global":
            raise ConfigError("prune.importance=lamp ranks channels exactly like l2 within one layer (its score is "
                              "monotone in the squared norm); it chooses layer-wise ratios only with one global "
                              "ranking: set prune.scope=global")
        gn = dict(group_norm or {})
        unknown = set(gn) - {"reg", "alpha"}
        if unknown:
            raise ConfigError(f"prune.group_norm takes reg and alpha, got {sorted(unknown)}")
        self.gn_reg = float(gn.get("reg", 1e-4))
        self.gn_alpha = float(gn.get("alpha", 4.0))
        if self.gn_reg < 0 or self.gn_alpha < 0:
            raise ConfigError(f"prune.group_norm.reg and alpha must be >= 0, got {gn}")
        self.steps = int(steps)
        if self.steps < 1:
            raise ConfigError(f"prune.steps must be >= 1, got {steps}")
        if unit not in ("epoch", "step"):
            raise ConfigError(f"prune.unit must be epoch or step, got {unit!r}")
        self.unit = unit
        self.start = int(start)
        self.end = int(end) if end is not None else self.start + self.steps - 1
        if self.start < 0 or self.end < self.start or (self.steps > 1 and self.end - self.start < self.steps - 1):
            raise ConfigError(f"prune.start={start}, prune.end={end} cannot hold prune.steps={steps} pruning steps")
        self.exclude = list(exclude or [])
        self.max_layer_ratio = check_fraction("max_layer_ratio", max_layer_ratio, high_inclusive=True)
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
            if not isinstance(module, PRUNABLE_TYPES):
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
        self._before = {n: list(m.weight.shape) for n, m in student.named_modules() if isinstance(m, PRUNABLE_TYPES)}
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
        from compresslab.compress.quantization.layers import structure_of

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


__all__ = ["StructuredPruning", "StructuredPruningCallback", "prune_channels", "resize_to_state_dict",
           "fisher_diagonal", "GroupNormRegularizer", "IMPORTANCES",
           "structured_payload", "load_structured_payload", "STRUCTURED_FORMAT"]
