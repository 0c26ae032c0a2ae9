"""Unstructured (weight-level) pruning as a Lightning callback: one-shot magnitude pruning,
automated gradual pruning, regularize-then-cut, and iterative magnitude pruning with rewinding.

Masks are boolean tensors kept by the callback, keyed by the name of the layer inside
``pl_module.model`` (the student: the callback never looks at anything else on the
LightningModule, so a distillation teacher is never pruned). After every optimizer step
the pruned weights are set back to zero (and their gradients are zeroed before it), so
they stay exactly zero. The masks, the schedule position and the rewind snapshot are
the callback's ``state_dict`` — plain tensors inside Lightning's checkpoint — so a
crashed run resumed from ``last.ckpt`` continues with the same masks at the same point
of the schedule. The network's own state dict is never reparametrized (no
``weight_orig``/``weight_mask``), so the best checkpoint reloads into the plain student.

The artifact is the real sparse encoding of :mod:`compresslab.compress.sparse_encoding`.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.artifact import model_payload
from compresslab.compress.base import CompressionMethod
from compresslab.compress.pruning.common import (
    ScheduleTicks,
    check_fraction,
    check_schedule_fits,
    check_scope,
    hide_unfinished_epoch,
    layer_table,
    log_scalars,
    log_table,
    nonzero_macs,
    prunable_layers,
    rebuildable_from_spec,
    schedule_points,
    state_to_cpu,
    write_table,
)
from compresslab.compress.sparse_encoding import COMPRESSIONS, ENCODINGS, serialized_size, sparse_payload
from compresslab.errors import ConfigError
from compresslab.measure import count_macs

log = logging.getLogger(__name__)

UNITS = ("epoch", "step")


def agp_sparsity(t: float, initial: float, final: float, start: float, end: float) -> float:
    """Sparsity of automated gradual pruning at time ``t`` (Zhu & Gupta, "To prune, or not to
    prune", 2017, eq. 1): s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³ for t0 ≤ t ≤ t0 + nΔt,
    0 before ``start`` (no pruning yet) and s_f after ``end``."""
    if t < start:
        return 0.0
    if t >= end:
        return float(final)
    frac = (t - start) / (end - start)
    return float(final + (initial - final) * (1.0 - frac) ** 3)


@torch.no_grad()
def magnitude_masks(
    weights: dict[str, torch.Tensor],
    sparsity: float,
    scope: str = "layer",
    prior: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks that remove the ``sparsity`` fraction of smallest-|w| weights, per layer or
    globally over all given weights (Han et al., "Learning both Weights and Connections for
    Efficient Neural Networks", NeurIPS 2015). Weights already pruned in ``prior`` are removed
    first, so masks only grow. Exactly ``round(sparsity·n)`` weights are removed."""
    prior = prior or {}
    scores = {}
    for name, w in weights.items():
        s = w.detach().abs().float().flatten().clone()
        if name in prior:
            s[~prior[name].flatten().to(s.device)] = -1.0
        scores[name] = s
    masks = {}
    if scope == "global":
        flat = torch.cat([s for s in scores.values()])
        k = int(round(sparsity * flat.numel()))
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
        if k > 0:
            keep[torch.argsort(flat, stable=True)[:k]] = False
        offset = 0
        for name, w in weights.items():
            n = w.numel()
            masks[name] = keep[offset:offset + n].reshape(w.shape)
            offset += n
        return masks
    for name, w in weights.items():
        s = scores[name]
        k = int(round(sparsity * s.numel()))
        keep = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
        if k > 0:
            keep[torch.argsort(s, stable=True)[:k]] = False
        masks[name] = keep.reshape(w.shape)
    return masks


@torch.no_grad()
def threshold_masks(weights: dict[str, torch.Tensor], threshold: float,
                    prior: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks of the weights with |w| > ``threshold`` (and not pruned in ``prior``)."""
    prior = prior or {}
    out = {}
    for name, w in weights.items():
        keep = w.detach().abs() > threshold
        if name in prior:
            keep &= prior[name].to(keep.device)
        out[name] = keep
    return out


def sparsity_of(weights: dict[str, torch.Tensor]) -> float:
    """Fraction of exact zeros over all given tensors."""
    total = sum(w.numel() for w in weights.values())
    nnz = sum(int(torch.count_nonzero(w.detach())) for w in weights.values())
    return 1.0 - nnz / total if total else 0.0


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
            self._layers = prunable_layers(model, self.method.include_classifier, self.method.exclude)
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
            hide_unfinished_epoch(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.last_state = state_to_cpu(pl_module.model.state_dict())
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


class UnstructuredPruning(CompressionMethod, abc.ABC):
    """Base of the unstructured methods: prunable-weight selection, masks, finalize, sparse export.

    ``final_sparsity`` is the fraction of prunable weights (conv/linear weights, the
    classifier excluded unless ``include_classifier``; ``exclude`` name patterns never
    pruned) set to zero at the end. ``scope``: ``layer`` (each layer to the same sparsity)
    or ``global`` (one magnitude threshold across layers). ``unit``: schedule times in
    ``epoch``s or optimizer ``step``s. ``select_after_pruning``: only epochs after the
    schedule finished can be the val-selected checkpoint. ``encoding``/``compression``:
    the sparse artifact's layout (see :mod:`compresslab.compress.sparse_encoding`).
    ``epochs``: the student's epochs (``${student.epochs}``), to check the schedule early.
    """

    def __init__(
        self,
        name: str,
        final_sparsity: float = 0.9,
        scope: str = "layer",
        include_classifier: bool = False,
        exclude: Sequence[str] = (),
        unit: str = "epoch",
        select_after_pruning: bool = True,
        encoding: str = "auto",
        compression: str = "lzma",
        epochs: int | None = None,
    ) -> None:
        super().__init__(name)
        self.final_sparsity = check_fraction("final_sparsity", final_sparsity)
        self.scope = check_scope(scope)
        self.include_classifier = bool(include_classifier)
        self.exclude = list(exclude or [])
        if unit not in UNITS:
            raise ConfigError(f"prune.unit must be one of {UNITS}, got {unit!r}")
        self.unit = unit
        self.select_after_pruning = bool(select_after_pruning)
        if encoding not in ENCODINGS:
            raise ConfigError(f"prune.encoding must be one of {ENCODINGS}, got {encoding!r}")
        if compression not in COMPRESSIONS:
            raise ConfigError(f"prune.compression must be one of {COMPRESSIONS}, got {compression!r}")
        self.encoding, self.compression = encoding, compression
        self.epochs = None if epochs is None else int(epochs)
        self._callback: UnstructuredPruningCallback | None = None
        self._example: torch.Tensor | None = None
        self._report: dict[str, Any] = {}
        self._table: list[dict] = []
        self._prunable: list[str] = []

    # ---- what subclasses define ---------------------------------------------
    @abc.abstractmethod
    def points(self) -> list[tuple[int, float]]:
        """The schedule: (time in ``unit``, target sparsity) pairs, increasing in time."""

    def compute_masks(self, weights, target: float, prior) -> dict[str, torch.Tensor]:
        """New keep-masks at a schedule point (default: magnitude at ``target``)."""
        return magnitude_masks(weights, target, self.scope, prior)

    def before_point(self, cb: UnstructuredPruningCallback, trainer, pl_module, t: int) -> None:
        """Called at every tick before the schedule is checked (lottery snapshots here)."""

    def after_point(self, cb: UnstructuredPruningCallback, trainer, pl_module, t: int) -> None:
        """Called after masks were updated at schedule time ``t``."""

    def add_penalty_grad(self, cb: UnstructuredPruningCallback, weights: dict[str, torch.Tensor]) -> None:
        """Add a regularizer's gradient to the prunable weights' grads (default: none)."""

    def _check_schedule(self) -> None:
        pts = self.points()
        check_schedule_fits(pts[-1][0], self.unit, self.epochs, f"prune={self.name}")

    # ---- CompressionMethod hooks ---------------------------------------------
    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        self._example = datamodule.example_batch(1)
        self._report = {"prune_method": self.name, "macs_before": count_macs(student, self._example),
                        "params_before": sum(p.numel() for p in student.parameters())}
        return student

    def callbacks(self) -> list[Callback]:
        self._callback = UnstructuredPruningCallback(self)
        return [self._callback]

    @torch.no_grad()
    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        cb = self._callback
        layers = prunable_layers(student, self.include_classifier, self.exclude)
        selected = "val-best"
        if cb is not None and cb.masks:
            stale = any(bool((layers[n].weight.detach()[~m.to(layers[n].weight.device)] != 0).any())
                        for n, m in cb.masks.items() if n in layers)
            if stale and cb.last_state is not None:
                log.warning("prune=%s: the val-selected weights predate the final masks; using the last epoch's "
                            "weights (trained with them) instead", self.name)
                student.load_state_dict(cb.last_state)
                selected = "last (val-best epoch preceded the end of the pruning schedule)"
            for n, m in cb.masks.items():
                if n in layers:
                    layers[n].weight.masked_fill_(~m.to(layers[n].weight.device), 0.0)
        for layer in layers.values():  # -0.0 -> +0.0, so the encoding sees every zero as a zero
            layer.weight.masked_fill_(layer.weight == 0, 0.0)
        self._prunable = list(layers)
        weights = {n: m.weight for n, m in layers.items()}
        total = sum(w.numel() for w in weights.values())
        nnz = sum(int(torch.count_nonzero(w)) for w in weights.values())
        self._table = layer_table(student, self._prunable)
        example = self._example if self._example is not None else datamodule.example_batch(1)
        self._report.update({
            "prune_method": self.name,
            "final_sparsity_target": self.final_sparsity,
            "sparsity_prunable": 1.0 - nnz / total if total else 0.0,
            "prunable_params": total,
            "prunable_nonzero": nnz,
            "macs_after": count_macs(student, example),
            "macs_nonzero": nonzero_macs(student, example),
            "selected_weights": selected,
            "schedule_done": bool(cb.done) if cb is not None else False,
            "schedule_history": list(cb.history) if cb is not None else [],
            "layer_sparsity": {r["layer"]: round(r["sparsity"], 6) for r in self._table},
        })
        if self._report.get("macs_nonzero") and self._report.get("macs_before"):
            self._report["macs_nonzero_ratio"] = self._report["macs_before"] / max(1, self._report["macs_nonzero"])
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict | None:
        arch, shape, classes = context["arch"], context["input_shape"], context["num_classes"]
        if not rebuildable_from_spec(student, context):
            log.warning("prune=%s: the student's structure differs from its arch spec (changed by another "
                        "method); leaving the artifact format to that method", self.name)
            self._report["artifact_encoding"] = "not claimed (structure changed by another method)"
            return None
        sparse_keys = [f"{n}.weight" for n in self._prunable] if self.encoding in ("bitmask", "index") else None
        payload = sparse_payload(student, arch, shape, classes, encoding=self.encoding,
                                 compression=self.compression, sparse_keys=sparse_keys,
                                 meta={"prune": self.name, "final_sparsity": self.final_sparsity,
                                       "sparsity_prunable": self._report.get("sparsity_prunable")})
        dense = serialized_size(model_payload(student, arch, shape, classes))
        encoded = serialized_size(payload)
        layouts: dict[str, int] = {}
        for rec in payload["tensors"]:
            layouts[rec["layout"]] = layouts.get(rec["layout"], 0) + 1
        self._report.update({
            "dense_size_bytes": dense,
            "encoded_size_bytes": encoded,
            "encoded_raw_bytes": int(payload["raw_bytes"]),
            "encoded_vs_dense": encoded / dense,
            "encoding_layouts": layouts,
            "compression": self.compression,
        })
        run_dir = context.get("run_dir")
        if run_dir is not None:
            paths = write_table(self._table, Path(run_dir) / "pruning" / "layer_sparsity",
                                title=f"prune={self.name}: per-layer sparsity")
            self._report["layer_sparsity_table"] = paths["csv"]
        return payload

    def report(self) -> dict[str, Any]:
        return dict(self._report)


class AGPPruning(UnstructuredPruning):
    """Automated gradual pruning (Zhu & Gupta, "To prune, or not to prune: exploring the efficacy
    of pruning for model compression", 2017): magnitude masks recomputed every ``frequency``
    units from ``start`` to ``end``, sparsity following s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³,
    then fine-tuning with the final masks."""

    def __init__(self, name: str, initial_sparsity: float = 0.0, start: int = 1, end: int = 8,
                 frequency: int = 1, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.initial_sparsity = check_fraction("initial_sparsity", initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ConfigError("prune.initial_sparsity must be <= prune.final_sparsity")
        self.start, self.end, self.frequency = int(start), int(end), int(frequency)
        if self.start < 0:
            raise ConfigError(f"prune.start must be >= 0, got {start}")
        self._points = [(t, agp_sparsity(t, self.initial_sparsity, self.final_sparsity, self.start, self.end)
                         if self.end > self.start else self.final_sparsity)
                        for t in schedule_points(self.start, self.end, self.frequency)]
        self._check_schedule()

    def points(self) -> list[tuple[int, float]]:
        return list(self._points)


class MagnitudePruning(UnstructuredPruning):
    """One-shot magnitude pruning (Han et al., NeurIPS 2015) at time ``at``, then fine-tuning.

    ``rounds`` > 1 is Han et al.'s iterative pruning (Sec. 3.3, "Iterative Pruning"): train → prune
    → retrain, repeated: ``rounds`` rounds of ``at`` units; at the end of round r the weights are
    pruned to 1 − (1 − s_f)^(r/R) and training continues from the surviving weights.

    ``lottery.enabled`` turns it into iterative magnitude pruning with weight rewinding
    (Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019; rewinding to an early
    iterate: Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
    ICML 2020): ``lottery.rounds`` rounds of ``at`` units each, pruned on the same schedule, and
    after each pruning the surviving weights are reset to their values at time
    ``lottery.rewind_to`` (0 = initialization), with the optimizer state of the student's
    parameters cleared. The learning-rate schedule is not restarted.
    ``lottery.reinit: random`` is the paper's control: the mask is found exactly as for the
    winning ticket, but after the last pruning the surviving weights are re-drawn from the
    initialization distribution instead of rewound — each tensor's values at ``rewind_to`` in a
    random order (seeded by ``lottery.reinit_seed``), i.e. a fresh i.i.d. sample of the same
    distribution, unrelated to the mask.
    """

    REINITS = ("rewind", "random")

    def __init__(self, name: str, at: int = 5, rounds: int = 1, lottery: dict | None = None, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.at = int(at)
        lot = dict(lottery or {})
        self.lottery = bool(lot.get("enabled", False))
        self.reinit = str(lot.get("reinit", "rewind"))
        self.reinit_seed = int(lot.get("reinit_seed", 1))
        if self.reinit not in self.REINITS:
            raise ConfigError(f"prune.lottery.reinit must be one of {self.REINITS}, got {self.reinit!r}")
        if self.lottery:
            if int(rounds) != 1:
                raise ConfigError("prune.rounds is the number of prune-retrain rounds without rewinding; with "
                                  "prune.lottery.enabled=true set prune.lottery.rounds instead")
            self.rounds = int(lot.get("rounds", 3))
            self.rewind_to = int(lot.get("rewind_to", 0))
        else:
            self.rounds = int(rounds)
            self.rewind_to = 0
        if self.at < 0 or ((self.lottery or self.rounds > 1) and self.at < 1):
            raise ConfigError(f"prune.at must be >= {1 if self.lottery or self.rounds > 1 else 0}, got {at}")
        if self.rounds < 1:
            what = "prune.lottery.rounds" if self.lottery else "prune.rounds"
            raise ConfigError(f"{what} must be >= 1, got {self.rounds}")
        if self.lottery and not 0 <= self.rewind_to < self.at:
            raise ConfigError(f"prune.lottery.rewind_to must be in [0, prune.at={self.at}), got {self.rewind_to}")
        s_f = self.final_sparsity
        self._points = [(self.at * r, 1.0 - (1.0 - s_f) ** (r / self.rounds)) for r in range(1, self.rounds + 1)]
        self._check_schedule()

    def points(self) -> list[tuple[int, float]]:
        return list(self._points)

    def before_point(self, cb, trainer, pl_module, t: int) -> None:
        if self.lottery and cb.rewind_state is None and t >= self.rewind_to:
            cb.rewind_state = state_to_cpu(pl_module.model.state_dict())

    def reinit_state(self, state: dict[str, torch.Tensor], parameter_names) -> dict[str, torch.Tensor]:
        """``state`` with every parameter tensor's values in a seeded random order (buffers kept)."""
        g = torch.Generator().manual_seed(self.reinit_seed)
        out = dict(state)
        for key in sorted(parameter_names):
            if key in out and out[key].is_floating_point() and out[key].numel() > 1:
                flat = out[key].flatten()
                out[key] = flat[torch.randperm(flat.numel(), generator=g)].reshape(out[key].shape)
        return out

    @torch.no_grad()
    def after_point(self, cb, trainer, pl_module, t: int) -> None:
        if not self.lottery or cb.rewind_state is None:
            return
        model = pl_module.model
        device = next(model.parameters()).device
        state = cb.rewind_state
        last = t >= self._points[-1][0]
        if last and self.reinit == "random":
            state = self.reinit_state(state, [n for n, _ in model.named_parameters()])
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
        cb.apply_masks(model)
        params = set(model.parameters())
        for opt in trainer.optimizers:
            for p in [p for p in opt.state if p in params]:
                del opt.state[p]
        cb.history[-1]["rewound_to"] = "random re-init" if last and self.reinit == "random" else self.rewind_to


class L1ThresholdPruning(UnstructuredPruning):
    """Regularize, then cut (Han et al., NeurIPS 2015, Sec. 3.1): train with an L1 (or L2)
    penalty ``strength``·Σ|w| (or Σw²) on the prunable weights — added to their gradients
    before each optimizer step, which equals adding it to the loss — then at time ``cut``
    zero the weights with |w| ≤ ``threshold`` (or, with ``threshold: null``, the
    ``final_sparsity`` fraction of smallest weights) and fine-tune with the masks fixed.
    ``regularize_after_cut`` keeps the penalty on while fine-tuning."""

    def __init__(self, name: str, penalty: str = "l1", strength: float = 1e-4, cut: int = 8,
                 threshold: float | None = None, regularize_after_cut: bool = False, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        if penalty not in ("l1", "l2"):
            raise ConfigError(f"prune.penalty must be l1 or l2, got {penalty!r}")
        if float(strength) < 0:
            raise ConfigError(f"prune.strength must be >= 0, got {strength}")
        self.penalty, self.strength = penalty, float(strength)
        self.cut = int(cut)
        self.threshold = None if threshold is None else float(threshold)
        self.regularize_after_cut = bool(regularize_after_cut)
        self._check_schedule()

    def points(self) -> list[tuple[int, float]]:
        return [(self.cut, self.final_sparsity)]

    def compute_masks(self, weights, target: float, prior) -> dict[str, torch.Tensor]:
        if self.threshold is not None:
            return threshold_masks(weights, self.threshold, prior)
        return magnitude_masks(weights, target, self.scope, prior)

    def add_penalty_grad(self, cb, weights) -> None:
        if self.strength == 0 or (cb.done and not self.regularize_after_cut):
            return
        for w in weights.values():
            if w.grad is None:
                continue
            if self.penalty == "l1":
                w.grad.add_(torch.sign(w.detach()), alpha=self.strength)
            else:
                w.grad.add_(w.detach(), alpha=2.0 * self.strength)


__all__ = [
    "AGPPruning", "L1ThresholdPruning", "MagnitudePruning", "UnstructuredPruning", "UnstructuredPruningCallback",
    "agp_sparsity", "magnitude_masks", "threshold_masks", "sparsity_of",
]
