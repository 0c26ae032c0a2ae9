"""``prune=sparsegpt``: SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can
Be Accurately Pruned in One-Shot", ICML 2023, Algorithm 1).

Per Linear layer, with the calibration Hessian ``H = 2XᵀX/N`` of the layer-wise problem
``min ‖XW'ᵀ − XWᵀ‖²``: dampened by ``percdamp`` × its mean diagonal, inverted through Cholesky
(the upper Cholesky factor of ``H⁻¹`` holds every row's sequence of inverse Hessians), the
columns are processed left to right in lazy blocks of ``blocksize``. At the start of each block
the mask of its columns is chosen adaptively from the OBS saliency ``w² / [H⁻¹]_jj²`` (the
lowest ``sparsity`` share of the block's weights; N:M: the ``m − n`` lowest of every group of
``m``, chosen when the group's first column is reached); each column's pruned weights are zeroed
and the error is spread over the not yet processed columns through the OBS update
``δ = −(w_j / [H⁻¹]_jj) · H⁻¹_{j, j:}``, applied within the block at once and to the later
columns once per block. Input features never seen in calibration (zero diagonal) get a unit
diagonal; their weights are kept as they are (the reference code zeroes them: that would break
an exact N:M count). Written here rather than taken from llm-compressor (it cannot be installed
beside this project's torch; see :mod:`compresslab.compress.prune.oneshot`).
"""

from __future__ import annotations

import torch

from compresslab.compress.calibration import InputStats
from compresslab.compress.prune.oneshot import OneShotPruning
from compresslab.compress.prune.options import SparseGPTOptions
from compresslab.errors import ConfigError


@torch.no_grad()
def inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, ``λ = percdamp · mean(diag H)`` (dead inputs: diag 1)."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += float(percdamp) * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, h: torch.Tensor, sparsity: float, n: int | None = None,
                    m: int | None = None, blocksize: int = 128, percdamp: float = 0.01,
                    prune_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The pruned and reconstructed weight (out × in) of SparseGPT (module doc); ``h`` = XᵀX (any
    positive scale). ``prune_mask`` (True = pruned) fixes the mask instead of choosing it, leaving
    only the reconstruction. Computed in float64, returned in ``weight``'s dtype."""
    w = weight.detach().double().clone()
    rows, cols = w.shape
    if n is not None and blocksize % m:
        raise ConfigError(f"prune.blocksize={blocksize} must be a multiple of prune.m={m}")
    hinv = inverse_hessian_factor(h.to(w.device), percdamp).to(w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = torch.diag(hinv1)
        if prune_mask is not None:
            mask1 = prune_mask[:, i1:i2].to(w.device).bool()
        elif n is None:
            saliency = (w1 ** 2 / d.unsqueeze(0) ** 2).flatten()
            mask1 = torch.zeros(saliency.numel(), dtype=torch.bool, device=w.device)
            mask1[torch.argsort(saliency, stable=True)[:int(saliency.numel() * float(sparsity))]] = True
            mask1 = mask1.reshape(w1.shape)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if prune_mask is None and n is not None and i % m == 0:
                saliency = w1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                low = torch.argsort(saliency, dim=1, stable=True)[:, :m - n]
                mask1.scatter_(1, i + low, True)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q  # exactly zero where pruned, untouched where kept
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype)


class SparseGPTPruning(OneShotPruning):
    """SparseGPT (Frantar & Alistarh, ICML 2023; module doc), one-shot after training.
    ``blocksize``: the lazy-update block (a multiple of ``m`` with N:M); ``percdamp``: the
    dampening of the Hessian, as a fraction of its mean diagonal."""

    options = SparseGPTOptions

    def __init__(self, name: str, blocksize: int = 128, percdamp: float = 0.01, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.blocksize, self.percdamp = int(blocksize), float(percdamp)
        if self.m is not None and self.blocksize % self.m:
            raise ConfigError(f"prune.blocksize={blocksize} must be a multiple of prune.m={self.m} "
                              "(N:M groups must not straddle two lazy blocks)")

    def pruned_weight(self, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
        return sparsegpt_prune(weight, stats.xtx, self.final_sparsity, self.n, self.m, self.blocksize, self.percdamp)
