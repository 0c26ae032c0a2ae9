"""Unstructured (weight-level) pruning as a Lightning callback: automated gradual pruning and
regularize-then-cut here, one-shot / iterative magnitude pruning with rewinding in
:mod:`compresslab.compress.prune.magnitude`, the callback in
:mod:`compresslab.compress.prune.unstructured_callback`.

Masks are boolean tensors kept by the callback, keyed by the name of the layer inside
``pl_module.model`` (the student: the callback never looks at anything else on the
LightningModule, so a distillation teacher is never pruned). After every optimizer step
the pruned weights are set back to zero (and their gradients are zeroed before it), so
they stay exactly zero. The masks, the schedule position and the rewind snapshot are
the callback's ``state_dict`` — plain tensors inside Lightning's checkpoint — so a
crashed run resumed from ``last.ckpt`` continues with the same masks at the same point
of the schedule. The network's own state dict is never reparametrized (no
``weight_orig``/``weight_mask``), so the best checkpoint reloads into the plain student.

The masks are :mod:`compresslab.compress.prune.masks`; the artifact is the real sparse encoding
of :mod:`compresslab.compress.codecs.sparse`.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.artifact import model_payload
from compresslab.compress.base import CompressionMethod
from compresslab.compress.codecs.sparse import serialized_size, sparse_payload
from compresslab.compress.common import CONV_LINEAR, select_layers
from compresslab.compress.prune.common import (
    check_schedule_fits,
    layer_table,
    nonzero_macs,
    schedule_points,
    write_table,
)
from compresslab.compress.prune.options import AGPOptions, L1ThresholdOptions
from compresslab.compress.prune.masks import agp_sparsity, magnitude_masks, threshold_masks
from compresslab.compress.prune.unstructured_callback import UnstructuredPruningCallback
from compresslab.compress.structure import rebuildable_from_spec
from compresslab.errors import ConfigError
from compresslab.measure import count_macs

log = logging.getLogger(__name__)

class UnstructuredPruning(CompressionMethod, abc.ABC):
    """Base of the unstructured methods: prunable-weight selection, masks, finalize, sparse export.

    ``final_sparsity`` is the fraction of prunable weights (conv/linear weights, the
    classifier excluded unless ``include_classifier``; ``exclude`` name patterns never
    pruned) set to zero at the end. ``scope``: ``layer`` (each layer to the same sparsity)
    or ``global`` (one magnitude threshold across layers). ``unit``: schedule times in
    ``epoch``s or optimizer ``step``s. ``select_after_pruning``: only epochs after the
    schedule finished can be the val-selected checkpoint. ``encoding``/``compression``:
    the sparse artifact's layout (see :mod:`compresslab.compress.codecs.sparse`).
    ``epochs``: the student's epochs (``${student.epochs}``), to check the schedule early.
    """

    codec_kind = "sparse"
    #: True for a method that prunes once after training (no callback, no fine-tuning): its
    #: :meth:`prune_after_training` runs at the start of :meth:`finalize`
    post_training = False

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
        self.final_sparsity, self.scope = float(final_sparsity), scope
        self.include_classifier = bool(include_classifier)
        self.exclude = list(exclude or [])
        self.unit = unit
        self.select_after_pruning = bool(select_after_pruning)
        self.encoding, self.compression = encoding, compression
        self.epochs = None if epochs is None else int(epochs)
        self._callback: UnstructuredPruningCallback | None = None
        self._example: torch.Tensor | None = None
        self._report: dict[str, Any] = {}
        self._table: list[dict] = []
        self._prunable: list[str] = []

    def prunable(self, model: nn.Module) -> dict[str, nn.Module]:
        """The conv/linear layers this method prunes: ``exclude`` and, unless ``include_classifier``,
        the classifier left out."""
        return select_layers(model, self.exclude, types=CONV_LINEAR, include_classifier=self.include_classifier,
                             case_sensitive=True)

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

    def prune_after_training(self, student: nn.Module, datamodule) -> None:
        """Prune the trained student in place (the :attr:`post_training` methods)."""

    def _check_schedule(self) -> None:
        pts = self.points()
        check_schedule_fits(pts[-1][0], self.unit, self.epochs, f"prune={self.name}")

    # ---- CompressionMethod hooks ---------------------------------------------
    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        self._example = datamodule.example_batch(1)
        self._report = {"macs_before": count_macs(student, self._example),
                        "params_before": sum(p.numel() for p in student.parameters())}
        return student

    def callbacks(self) -> list[Callback]:
        if self.post_training:
            return []
        self._callback = UnstructuredPruningCallback(self)
        return [self._callback]

    @torch.no_grad()
    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        if self.post_training:
            self.prune_after_training(student, datamodule)
        cb = self._callback
        layers = self.prunable(student)
        selected = "val-best, pruned after training (no fine-tuning)" if self.post_training else "val-best"
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
            "final_sparsity_target": self.final_sparsity,
            "sparsity_prunable": 1.0 - nnz / total if total else 0.0,
            "prunable_params": total,
            "prunable_nonzero": nnz,
            "macs_after": count_macs(student, example),
            "macs_nonzero": nonzero_macs(student, example),
            "selected_weights": selected,
            "schedule_done": bool(cb.done) if cb is not None else self.post_training,
            "schedule_history": list(cb.history) if cb is not None else [],
            "layer_sparsity": {r["layer"]: round(r["sparsity"], 6) for r in self._table},
        })
        if self._report.get("macs_nonzero") and self._report.get("macs_before"):
            self._report["macs_nonzero_ratio"] = self._report["macs_before"] / max(1, self._report["macs_nonzero"])
        if self.context is not None:  # what this method's own encoding of the pruned student takes
            self._report.update(self._encoding_figures(student, self.context))
        return student

    def _encoding_figures(self, student: nn.Module, context) -> dict[str, Any]:
        """The sizes of the sparse encoding of the finalized student (whichever method claims the file)."""
        payload = self._sparse_payload(student, context)
        dense = serialized_size(model_payload(student, context["arch"], context["input_shape"],
                                              context["num_classes"]))
        encoded = serialized_size(payload)
        layouts: dict[str, int] = {}
        for rec in payload["tensors"]:
            layouts[rec["layout"]] = layouts.get(rec["layout"], 0) + 1
        return {"dense_size_bytes": dense, "encoded_size_bytes": encoded,
                "encoded_raw_bytes": int(payload["raw_bytes"]), "encoded_vs_dense": encoded / dense,
                "encoding_layouts": layouts, "compression": self.compression}

    def _sparse_payload(self, student: nn.Module, context) -> dict:
        sparse_keys = [f"{n}.weight" for n in self._prunable] if self.encoding in ("bitmask", "index") else None
        return sparse_payload(student, context["arch"], context["input_shape"], context["num_classes"],
                              encoding=self.encoding, compression=self.compression, sparse_keys=sparse_keys,
                              meta={"prune": self.name, "final_sparsity": self.final_sparsity,
                                    "sparsity_prunable": self._report.get("sparsity_prunable")})

    def side_files(self, run_dir: Path) -> dict[str, str]:
        paths = write_table(self._table, Path(run_dir) / "pruning" / "layer_sparsity",
                            title=f"prune={self.name}: per-layer sparsity")
        return {"layer_sparsity_table": paths["csv"]}

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict | None:
        if not rebuildable_from_spec(student, context):  # another method changed the structure: its codec
            return None                                  # stores these tensors through the sparse layer
        return self._sparse_payload(student, context)

    def report(self) -> dict[str, Any]:
        return dict(self._report)


class AGPPruning(UnstructuredPruning):
    """Automated gradual pruning (Zhu & Gupta, "To prune, or not to prune: exploring the efficacy
    of pruning for model compression", 2017): magnitude masks recomputed every ``frequency``
    units from ``start`` to ``end``, sparsity following s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³,
    then fine-tuning with the final masks."""

    options = AGPOptions

    def __init__(self, name: str, initial_sparsity: float = 0.0, start: int = 1, end: int = 8,
                 frequency: int = 1, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.initial_sparsity = float(initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ConfigError("prune.initial_sparsity must be <= prune.final_sparsity")
        self.start, self.end, self.frequency = int(start), int(end), int(frequency)
        self._points = [(t, agp_sparsity(t, self.initial_sparsity, self.final_sparsity, self.start, self.end)
                         if self.end > self.start else self.final_sparsity)
                        for t in schedule_points(self.start, self.end, self.frequency)]
        self._check_schedule()

    def points(self) -> list[tuple[int, float]]:
        return list(self._points)


class L1ThresholdPruning(UnstructuredPruning):
    """Regularize, then cut (Han et al., NeurIPS 2015, Sec. 3.1): train with an L1 (or L2)
    penalty ``strength``·Σ|w| (or Σw²) on the prunable weights — added to their gradients
    before each optimizer step, which equals adding it to the loss — then at time ``cut``
    zero the weights with |w| ≤ ``threshold`` (or, with ``threshold: null``, the
    ``final_sparsity`` fraction of smallest weights) and fine-tune with the masks fixed.
    ``regularize_after_cut`` keeps the penalty on while fine-tuning."""

    options = L1ThresholdOptions

    def __init__(self, name: str, penalty: str = "l1", strength: float = 1e-4, cut: int = 8,
                 threshold: float | None = None, regularize_after_cut: bool = False, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
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
