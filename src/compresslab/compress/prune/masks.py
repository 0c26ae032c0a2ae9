"""Weight masks of the unstructured pruning methods: the magnitude criterion (global or per layer),
the threshold cut, the AGP sparsity schedule, and the sparsity of a set of weights."""

from __future__ import annotations

import torch


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
