"""``prune=wanda``: Pruning by Weights and activations (Sun, Liu, Bair & Kolter, "A Simple and
Effective Pruning Approach for Large Language Models", ICLR 2024).

Each weight's score is ``S_ij = |W_ij| · ‖X_j‖₂`` (the L2 norm of input feature j over all
calibration tokens); within each comparison group — every output row for unstructured sparsity
(the paper's per-output comparison, Sec. 3), every group of ``m`` consecutive input weights for
N:M — the lowest-scored weights are zeroed. No weight update, one pass. Written here rather than
taken from llm-compressor (it cannot be installed beside this project's torch; see
:mod:`compresslab.compress.prune.oneshot`).
"""

from __future__ import annotations

import torch

from compresslab.compress.calibration import InputStats
from compresslab.compress.prune.nm import nm_mask
from compresslab.compress.prune.oneshot import OneShotPruning, row_keep_mask
from compresslab.compress.prune.options import OneShotOptions


@torch.no_grad()
def wanda_mask(weight: torch.Tensor, x: torch.Tensor, sparsity: float, n: int | None = None,
               m: int | None = None) -> torch.Tensor:
    """Wanda's keep-mask from the calibration inputs ``x`` (tokens × in) of ``weight`` (out × in)."""
    return wanda_mask_from_norms(weight, x.double().norm(p=2, dim=0), sparsity, n, m)


@torch.no_grad()
def wanda_mask_from_norms(weight: torch.Tensor, norms: torch.Tensor, sparsity: float, n: int | None = None,
                          m: int | None = None) -> torch.Tensor:
    """Wanda's keep-mask from the input norms ``‖X_j‖₂`` (``sqrt(diag XᵀX)``): score ``|W_ij|·‖X_j‖₂``;
    per output row the ``int(sparsity·in)`` lowest scores removed, or with ``n``/``m`` the ``n``
    highest of every ``m`` consecutive inputs kept."""
    score = weight.detach().abs().double() * norms.to(weight.device).double().unsqueeze(0)
    if n is not None:
        return nm_mask(score, n, m)
    return row_keep_mask(score, sparsity)


class WandaPruning(OneShotPruning):
    """Wanda (Sun et al., ICLR 2024; module doc), one-shot after training from calibration inputs."""

    options = OneShotOptions

    def pruned_weight(self, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
        keep = wanda_mask_from_norms(weight, stats.xtx.diagonal().sqrt(), self.final_sparsity, self.n, self.m)
        return weight.detach().masked_fill(~keep.to(weight.device), 0.0)
