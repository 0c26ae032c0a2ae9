"""``prune=nm``: N:M semi-structured sparsity — exactly ``n`` nonzeros in every ``m``
consecutive weights along a layer's input (reduction) dimension (Mishra et al., "Accelerating
Sparse Deep Neural Networks", 2021, NVIDIA's 2:4 recipe: train dense, prune 2:4 by magnitude
once, fine-tune with the pattern fixed; Zhou et al., "Learning N:M Fine-grained Structured
Sparse Neural Networks From Scratch", ICLR 2021, for the gradual variant that lowers ``n`` step
by step from ``m``).

The groups run along the GEMM reduction dimension: a Linear's ``in_features``, a conv's
``in_channels/groups × kh × kw`` (its im2col row, the weight flattened per output channel), the
layout that cuSPARSELt / torch's ``to_sparse_semi_structured`` accelerate for 2:4. A layer whose
reduction dimension is not a multiple of ``m`` cannot hold the pattern and is left dense (listed
under ``nm_skipped``). The masks, their enforcement during fine-tuning (pruned weights and their
gradients held at zero), the schedule and the checkpoint state are the unstructured pruning
callback's (:mod:`compresslab.compress.prune.unstructured_callback`); only the mask rule differs.
The artifact stores each N:M layer as its kept values plus the position of each inside its
group of ``m`` (``log2 m`` bits each, :mod:`compresslab.compress.codecs.nm`).

Kernels: on CPU no N:M kernel exists in torch or torchao, so the reloaded model runs dense
(``nm_kernel: none``) and its latency is the dense model's; on a CUDA device with 2:4, torch's
semi-structured sparse tensors (cuSPARSELt / CUTLASS) are the kernel to use.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compresslab.compress.codecs.nm import nm_bytes, nm_pattern_ok, nm_payload
from compresslab.compress.prune.options import NMOptions
from compresslab.compress.prune.unstructured import UnstructuredPruning
from compresslab.compress.structure import rebuildable_from_spec
from compresslab.errors import ConfigError

log = logging.getLogger(__name__)


def reduction_view(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as (output channels, reduction dimension): the rows N:M groups run along."""
    return weight.reshape(weight.shape[0], -1)


@torch.no_grad()
def nm_mask(weight: torch.Tensor, n: int, m: int, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask with the ``n`` largest-|w| weights of every ``m`` consecutive weights along the
    reduction dimension (ties broken by position, stable). Weights already pruned in ``prior``
    rank last, so a mask never revives a weight while ``n`` decreases."""
    w2 = reduction_view(weight)
    if w2.shape[1] % m:
        raise ValueError(f"reduction dimension {w2.shape[1]} is not a multiple of m={m}")
    score = w2.detach().abs().float().clone()
    if prior is not None:
        score[~reduction_view(prior).to(score.device)] = -1.0
    groups = score.reshape(w2.shape[0], -1, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(weight.shape)


def n_schedule(n: int, m: int, steps: int) -> list[int]:
    """The ``n`` of each pruning step: one-shot ``[n]``; gradual, evenly from ``m`` down to ``n``
    (e.g. 2:4 in 2 steps: 3:4 then 2:4)."""
    if steps == 1:
        return [n]
    return [round(m - (m - n) * (i + 1) / steps) for i in range(steps)]


class NMPruning(UnstructuredPruning):
    """N:M sparsity (see the module docstring). ``n``, ``m``: keep ``n`` of every ``m``.
    ``start``: time (in ``unit``) of the first pruning step; ``steps``: 1 for one-shot, k > 1
    for k steps ``every`` units apart lowering the kept count from ``m`` to ``n`` (each step
    prunes within the previous mask), fine-tuning in between and after."""

    options = NMOptions
    codec_kind = "nm"

    def __init__(self, name: str, n: int = 2, m: int = 4, start: int = 1, steps: int = 1, every: int = 1,
                 **kwargs: Any) -> None:
        self.n, self.m = int(n), int(m)
        if not 1 <= self.n < self.m or self.m > 256:
            raise ConfigError(f"prune.n and prune.m must satisfy 1 <= n < m <= 256, got n={n}, m={m}")
        kwargs["final_sparsity"] = 1.0 - self.n / self.m  # the pattern fixes it
        super().__init__(name, **kwargs)
        self.start, self.steps, self.every = int(start), int(steps), int(every)
        if self.start < 0 or self.steps < 1 or self.every < 1 or self.steps > self.m - self.n:
            raise ConfigError(f"prune.start={start} must be >= 0, prune.every={every} >= 1 and prune.steps={steps} "
                              f"in 1..m-n={self.m - self.n} (each step keeps at least one fewer weight per group)")
        self._ns = n_schedule(self.n, self.m, self.steps)
        self._skipped: list[str] = []
        self._check_schedule()

    def prunable(self, model: nn.Module) -> dict[str, nn.Module]:
        """The selected conv/linear layers whose reduction dimension is a multiple of ``m``."""
        layers = super().prunable(model)
        self._skipped = [k for k, v in layers.items() if reduction_view(v.weight).shape[1] % self.m]
        return {k: v for k, v in layers.items() if k not in self._skipped}

    def points(self) -> list[tuple[int, float]]:
        return [(self.start + i * self.every, 1.0 - k / self.m) for i, k in enumerate(self._ns)]

    def compute_masks(self, weights, target: float, prior) -> dict[str, torch.Tensor]:
        keep = int(round(self.m * (1.0 - target)))
        return {name: nm_mask(w, keep, self.m, prior.get(name)) for name, w in weights.items()}

    def validate_student(self, student: nn.Module, datamodule) -> None:
        if not self.prunable(student):
            raise ConfigError(f"prune=nm: no selected conv/linear layer has a reduction dimension divisible by "
                              f"prune.m={self.m} (skipped: {self._skipped[:6]}); check prune.exclude / prune.m")

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        student = super().finalize(student, datamodule)
        layers = self.prunable(student)
        self._report.update({
            "nm_n": self.n, "nm_m": self.m, "nm_steps": self.steps, "nm_layers": list(layers),
            "nm_skipped": list(self._skipped),
            "nm_pattern_ok": all(nm_pattern_ok(reduction_view(v.weight), self.n, self.m) for v in layers.values()),
            # the artifact is measured on CPU, where no N:M kernel exists: it runs dense
            "nm_kernel": "none",
            "nm_kernel_reason": "no N:M sparse kernel on CPU (torch/torchao semi-structured sparsity, cuSPARSELt, "
                                "needs CUDA); the reloaded model runs dense",
            **nm_bytes({n: v.weight for n, v in layers.items()}, self.n, self.m),
        })
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict | None:
        if not rebuildable_from_spec(student, context):  # another method changed the structure: its codec
            return None
        return nm_payload(student, context, list(self.prunable(student)), self.n, self.m, meta={"prune": self.name})
