"""Tensor decompositions of a convolution kernel, computed with tensorly, and their rank selection
(the algorithms of ``lowrank=tucker`` / ``lowrank=cp``, :mod:`compresslab.compress.lowrank.tucker_cp`).

- :func:`tucker2_factorize`: Tucker-2 (Kim et al., ICLR 2016) with ``partial_tucker`` on the two
  channel modes (HOOI from an SVD start), as a :class:`~compresslab.compress.lowrank.factorized.Tucker2Conv`.
- :func:`cp_factorize`: CP (Lebedev et al., ICLR 2015) with ``parafac`` (ALS), as a
  :class:`~compresslab.compress.lowrank.factorized.CPConv`.
- ranks: :func:`evbmf_rank` (global analytic VBMF, Nakajima et al., JMLR 2013), :func:`energy_rank`,
  on the mode unfoldings (:func:`unfold`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from compresslab.compress.lowrank.factorized import CPConv, Tucker2Conv


def factor_params(conv: nn.Conv2d, kind: str, rank: Any) -> int:
    """Weights of the factorized layer (biases excluded)."""
    t, s, kh, kw = conv.weight.shape
    if kind == "tucker2":
        r_out, r_in = rank
        return (s * r_in if r_in < s else 0) + r_out * r_in * kh * kw + (r_out * t if r_out < t else 0)
    return int(rank) * (s + kh + kw + t)


# ---- the decompositions (tensorly) -----------------------------------------------------------------
def _kernel(w: torch.Tensor) -> torch.Tensor:
    """The kernel as a float64 CPU tensor for tensorly's pytorch backend."""
    return w.detach().cpu().double()


class _tensorly_torch:
    """tensorly's pytorch backend on one thread: the ALS/HOOI steps are many small products, and
    with several threads on a loaded 2-core machine they ran ~10x slower than on one."""

    def __enter__(self):
        import tensorly as tl

        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._ctx = tl.backend_context("pytorch")
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self._ctx.__exit__(*exc)
        finally:
            torch.set_num_threads(self._threads)


@torch.no_grad()
def tucker2_factorize(conv: nn.Conv2d, rank_out: int, rank_in: int, n_iter_max: int = 100) -> Tucker2Conv:
    """Tucker-2 of ``conv``'s kernel with ``partial_tucker`` (modes 0 and 1), as a :class:`Tucker2Conv`."""
    from tensorly.decomposition import partial_tucker

    t, s = conv.out_channels, conv.in_channels
    w = _kernel(conv.weight)
    modes, ranks = [], []
    if rank_out < t:
        modes.append(0)
        ranks.append(int(rank_out))
    if rank_in < s:
        modes.append(1)
        ranks.append(int(rank_in))
    new = Tucker2Conv(conv, rank_out, rank_in)
    if not modes:
        core, factors = w, []
    else:
        with _tensorly_torch():
            (core, factors), _ = partial_tucker(w, rank=ranks, modes=modes, init="svd", n_iter_max=n_iter_max)
    factor = dict(zip(modes, factors))
    dtype, device = conv.weight.dtype, conv.weight.device

    def tensor(a):
        return torch.as_tensor(a).to(dtype=dtype, device=device).contiguous()

    new.core.weight.copy_(tensor(core))
    if 1 in factor:  # V: S x R_in -> first.weight[b, s] = V[s, b]
        new.first.weight.copy_(tensor(factor[1].T)[:, :, None, None])
    if 0 in factor:  # U: T x R_out -> last.weight[t, a] = U[t, a]
        new.last.weight.copy_(tensor(factor[0])[:, :, None, None])
    if conv.bias is not None:
        (new.last if 0 in factor else new.core).bias.copy_(conv.bias)
    return new.to(device).train(conv.training)


@torch.no_grad()
def cp_factorize(conv: nn.Conv2d, rank: int, n_iter_max: int = 50, seed: int = 0, tol: float = 1e-6) -> CPConv:
    """CP of ``conv``'s kernel with ``parafac`` (ALS from an SVD start, stopping when the relative
    reconstruction error changes by less than ``tol``), as a :class:`CPConv`."""
    from tensorly.decomposition import parafac

    w = _kernel(conv.weight)
    with warnings.catch_warnings(), _tensorly_torch():
        warnings.simplefilter("ignore")  # rank > a mode's size: tensorly pads the SVD start (it warns)
        cp = parafac(w, rank=int(rank), init="svd", n_iter_max=n_iter_max, tol=tol, random_state=seed)
    weights, (a_t, a_s, a_y, a_x) = cp.weights, cp.factors
    new = CPConv(conv, rank)
    dtype, device = conv.weight.dtype, conv.weight.device

    def tensor(a):
        return torch.as_tensor(a).to(dtype=dtype, device=device).contiguous()

    new.pw_in.weight.copy_(tensor(a_s.T)[:, :, None, None])          # [r, s]
    new.dw_v.weight.copy_(tensor(a_y.T)[:, None, :, None])           # [r, 1, j, 1]
    new.dw_h.weight.copy_(tensor(a_x.T)[:, None, None, :])           # [r, 1, 1, i]
    new.pw_out.weight.copy_(tensor(a_t * torch.as_tensor(weights)[None, :])[:, :, None, None])  # [t, r]
    if conv.bias is not None:
        new.pw_out.bias.copy_(conv.bias)
    return new.to(device).train(conv.training)


# ---- rank selection --------------------------------------------------------------------------------
def _evbmf_objective(sigma2: float, s2: np.ndarray, L: int, M: int, xubar: float) -> float:
    """Nakajima et al.'s objective for the noise variance (sum of ψ over the scaled squared singular values)."""
    alpha = L / M
    x = s2 / (M * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    tau = 0.5 * (z1 - (1 + alpha) + np.sqrt(np.maximum((z1 - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))
    return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - tau) + np.sum(np.log((tau + 1) / z1))
                 + alpha * np.sum(np.log(tau / alpha + 1)))


def evbmf_rank(matrix: np.ndarray | torch.Tensor) -> int:
    """Rank of a matrix by empirical (global analytic) VBMF, Nakajima et al., JMLR 2013: the noise
    variance σ² minimises their objective over its theoretical bounds, and the rank is the number of
    singular values above ``sqrt(M σ² (1 + τ̄)(1 + α/τ̄))``, ``α = L/M``, ``τ̄ = 2.5129 sqrt(α)``."""
    from scipy.optimize import minimize_scalar

    y = matrix.detach().cpu().double().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, float)
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = torch.linalg.svdvals(torch.from_numpy(y)).numpy()
    s2 = s ** 2
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eh_ub = int(min(math.ceil(L / (1 + alpha)) - 1, L)) - 1
    upper = s2.sum() / (L * M)
    lower = max(s2[eh_ub + 1] / (M * xubar), float(np.mean(s2[eh_ub + 1:])) / M) if eh_ub + 1 < L else upper * 1e-6
    lower = max(lower, upper * 1e-12, 1e-300)
    if not lower < upper:
        return 0
    sigma2 = minimize_scalar(_evbmf_objective, args=(s2, L, M, xubar), bounds=(lower, upper), method="bounded").x
    threshold = math.sqrt(M * sigma2 * xubar)
    return int(np.sum(s > threshold))


def unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``w.shape[mode]`` rows."""
    return torch.movedim(w.detach().double(), mode, 0).reshape(w.shape[mode], -1)


def energy_rank(matrix: torch.Tensor, energy: float) -> int:
    """Smallest r whose top singular values keep ``energy`` of the sum of their squares."""
    e = torch.linalg.svdvals(matrix.double()) ** 2
    cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
    return int(torch.searchsorted(cum, torch.tensor(float(energy), dtype=cum.dtype)).item()) + 1
