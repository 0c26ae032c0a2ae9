"""One-shot post-training pruning of the ``nn.Linear`` layers of any model (a Hugging Face causal
LM, an image MLP), from calibration activations: the shared body of ``prune=wanda``
(:mod:`~compresslab.compress.prune.wanda`) and ``prune=sparsegpt``
(:mod:`~compresslab.compress.prune.sparsegpt`), and the mask patterns the post-training
``prune=magnitude prune.at=null`` baseline shares with them.

**Why written here.** llm-compressor implements both methods as modifiers, but it pins torch
2.14.0 / transformers <= 5.17 while this project runs torch 2.14.1, so it cannot be installed
beside it; torchao has neither. The algorithms are short and are tested against independent
computations of their formulas (``tests/test_llm_pruning.py``).

**Sequential calibration** is the shared helper :mod:`compresslab.compress.calibration`: the
calibration batches (the datamodule's calibration set, else the first ``num_calibration_batches``
of the ``calibration_split`` loader) are run through the model with forward hooks, and the
selected Linears are pruned group by group in forward order (a group: the layers reading the same
input, e.g. q/k/v), each group's input statistics ``XᵀX`` captured with every earlier group
already pruned: the papers' sequential scheme (Frantar & Alistarh 2023 Sec. 3.5; Sun et al. 2024
Sec. 3), at the granularity of input groups, which needs no knowledge of the model's blocks.
Embeddings are no Linear and the output layer (an LM's ``lm_head``) is left dense unless
``include_classifier``.

**Patterns.** Unstructured at ``final_sparsity``, or N:M with ``n`` and ``m`` set: exactly ``n``
nonzeros in every ``m`` consecutive input weights of each output row (the reduction dimension,
as ``prune=nm``); a layer whose ``in_features`` is not a multiple of ``m`` stays dense (listed
under ``nm_skipped``). An N:M result is stored with the compact N:M codec
(:mod:`compresslab.compress.codecs.nm`), an unstructured one with the sparse codec.
"""

from __future__ import annotations

import abc
import logging
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from compresslab.compress.calibration import InputStats, calibration_batches, sequential
from compresslab.compress.codecs.nm import nm_bytes, nm_pattern_ok, nm_payload
from compresslab.compress.common import select_layers
from compresslab.compress.prune.unstructured import UnstructuredPruning
from compresslab.compress.structure import rebuildable_from_spec
from compresslab.errors import ConfigError

log = logging.getLogger(__name__)

def check_pattern(n: int | None, m: int | None, final_sparsity: float) -> float:
    """The sparsity a method prunes to: ``final_sparsity``, or ``1 - n/m`` with an N:M pattern.
    Raises a ConfigError naming ``prune.n`` / ``prune.m`` for an impossible pattern."""
    if (n is None) != (m is None):
        raise ConfigError(f"prune.n and prune.m go together (n={n}, m={m}): set both for N:M sparsity "
                          "(e.g. prune.n=2 prune.m=4) or neither for unstructured sparsity at prune.final_sparsity")
    if n is None:
        return float(final_sparsity)
    if not 1 <= int(n) < int(m) <= 256:
        raise ConfigError(f"prune.n must be at least 1 and below prune.m (<= 256), got prune.n={n}, prune.m={m}: "
                          "n is the number of weights kept in every group of m (2:4 keeps 2 of 4)")
    return 1.0 - int(n) / int(m)


def split_by_multiple(layers: Mapping[str, nn.Module], m: int | None) -> tuple[dict[str, nn.Module], list[str]]:
    """``layers`` whose reduction dimension is a multiple of ``m`` (all of them without ``m``),
    and the names of the others."""
    if m is None:
        return dict(layers), []
    skipped = [k for k, v in layers.items() if v.weight[0].numel() % int(m)]
    return {k: v for k, v in layers.items() if k not in skipped}, skipped


@torch.no_grad()
def row_keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the ``int(sparsity · in)`` lowest-``score`` entries of every output row
    (ties by position)."""
    k = int(score.shape[1] * float(sparsity))
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], False)
    return keep


@torch.no_grad()
def output_rel_error(dense: torch.Tensor, pruned: torch.Tensor, xtx: torch.Tensor) -> float:
    """``‖X(W'−W)ᵀ‖² / ‖XWᵀ‖²`` on the calibration rows, from ``xtx = XᵀX`` alone."""
    d, w = (pruned.double() - dense.double()), dense.double()
    return float(torch.einsum("oi,ij,oj->", d, xtx, d) / torch.einsum("oi,ij,oj->", w, xtx, w).clamp_min(1e-30))


class OneShotPruning(UnstructuredPruning):
    """Base of the calibrated one-shot post-training methods (module doc): after training, the
    selected Linears are pruned layer by layer by :meth:`prune_layer`, with no fine-tuning.

    ``final_sparsity``: per layer, unstructured; ``n``/``m``: N:M instead (``final_sparsity`` is
    then ``1 − n/m``); ``num_calibration_batches`` of ``calibration_split`` (train or val, never
    test); ``include_classifier``: prune the output layer too; ``exclude``: name patterns left
    dense; ``encoding``/``compression``: the unstructured artifact's layout.
    """

    def __init__(self, name: str, final_sparsity: float = 0.5, n: int | None = None, m: int | None = None,
                 num_calibration_batches: int = 8, calibration_split: str = "train",
                 include_classifier: bool = False, exclude: Sequence[str] = (), encoding: str = "auto",
                 compression: str = "lzma") -> None:
        target = check_pattern(n, m, final_sparsity)
        super().__init__(name, final_sparsity=target, scope="layer", include_classifier=include_classifier,
                         exclude=exclude, select_after_pruning=False, encoding=encoding, compression=compression)
        self.n, self.m = (None, None) if n is None else (int(n), int(m))
        self.codec_kind = "sparse" if self.n is None else "nm"
        self.num_calibration_batches = int(num_calibration_batches)
        self.calibration_split = calibration_split
        self._skipped: list[str] = []

    post_training = True

    def prunable(self, model: nn.Module) -> dict[str, nn.Module]:
        """The selected ``nn.Linear`` layers (with N:M: those whose ``in_features`` is a multiple of ``m``)."""
        layers = select_layers(model, self.exclude, types=(nn.Linear,), include_classifier=self.include_classifier,
                               case_sensitive=True)
        layers, self._skipped = split_by_multiple(layers, self.m)
        return layers

    def points(self) -> list[tuple[int, float]]:
        return []  # nothing happens during training

    def validate_student(self, student: nn.Module, datamodule) -> None:
        if not self.prunable(student):
            raise ConfigError(f"prune={self.name}: the student has no selected nn.Linear layer to prune "
                              f"(skipped for prune.m={self.m}: {self._skipped[:6]}); check prune.exclude / "
                              "prune.include_classifier / prune.m")

    @abc.abstractmethod
    def pruned_weight(self, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
        """The pruned (and, for SparseGPT, reconstructed) weight from the layer's calibration statistics."""

    @torch.no_grad()
    def prune_after_training(self, student: nn.Module, datamodule) -> None:
        batches = calibration_batches(datamodule, self.num_calibration_batches, self.calibration_split)
        layers = self.prunable(student)
        errors: dict[str, float] = {}
        tokens = 0

        def transform(group: list[str], stats: Mapping[str, InputStats]) -> None:
            nonlocal tokens
            for name in group:
                w = layers[name].weight
                new = self.pruned_weight(w, stats[name]).to(w.dtype)
                errors[name] = round(output_rel_error(w, new, stats[name].xtx), 8)
                w.copy_(new)
                tokens = max(tokens, stats[name].count)

        start = time.perf_counter()
        groups = sequential(student, list(layers), batches, transform)
        missed = [n for n in layers if n not in errors]
        if missed:
            raise ConfigError(f"prune={self.name}: the calibration forward pass never reaches the Linear layers "
                              f"{missed[:6]}; leave them out with prune.exclude")
        self._report.update(calibration_batches=len(batches), calibration_tokens=tokens,
                            prune_seconds=time.perf_counter() - start, calibration_groups=len(groups),
                            layer_output_rel_error=errors)

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        student = super().finalize(student, datamodule)
        self._report.update(pattern_report(self, student))
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict | None:
        return pattern_export(self, student, context, lambda: super(OneShotPruning, self).export(student, context))


def pattern_report(method: UnstructuredPruning, student: nn.Module) -> dict[str, Any]:
    """The N:M figures of a method with ``n``/``m`` set (none for unstructured)."""
    if getattr(method, "n", None) is None:
        return {"pattern": "unstructured"}
    layers = method.prunable(student)
    return {"pattern": f"{method.n}:{method.m}", "nm_n": method.n, "nm_m": method.m, "nm_layers": list(layers),
            "nm_skipped": list(method._skipped),
            "nm_pattern_ok": all(nm_pattern_ok(v.weight.reshape(v.weight.shape[0], -1), method.n, method.m)
                                 for v in layers.values()),
            **nm_bytes({k: v.weight for k, v in layers.items()}, method.n, method.m)}


def pattern_export(method: UnstructuredPruning, student: nn.Module, context: dict[str, Any], unstructured) -> dict | None:
    """The N:M artifact of a method with ``n``/``m`` set, else ``unstructured()`` (the sparse one)."""
    if getattr(method, "n", None) is None:
        return unstructured()
    if not rebuildable_from_spec(student, context):  # another method changed the structure: its codec
        return None
    return nm_payload(student, context, list(method.prunable(student)), method.n, method.m,
                      meta={"prune": method.name})
