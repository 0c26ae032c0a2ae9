"""Group-wise integer weight grids and the two one-shot weight quantizers built on them:
round-to-nearest (RTN) and GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, Algorithm 1).

A weight ``W [out, in]`` is cut into groups of ``group_size`` consecutive input weights per output
row (``group_size = in``: one group per output channel). Each group has a scale ``s`` and an
integer zero point ``z``; its codes ``u`` are unsigned ``bits``-bit integers and ``W ≈ (u - z)·s``:

- asymmetric: ``s = (max(w, 0) - min(w, 0)) / (2^b - 1)``, ``z = round(-min(w, 0) / s)``;
- symmetric: ``s = 2·max|w| / (2^b - 1)``, ``z = 2^(b-1)`` (GPTQ's reference quantizer).

Either way a zero weight gets code ``z`` exactly, so pruned zeros stay zero. Scales are rounded
to fp16 (what the artifact stores) before the codes are computed, so the stored codes and scales
rebuild exactly the weights the method evaluated.

Why written here: llm-compressor (GPTQ, AWQ, SmoothQuant modifiers) pins torch 2.14.0 /
transformers<=5.17 while this project runs torch 2.14.1, and torchao's GPTQ is a CUDA-only
prototype; the algorithms are short, and ``tests/test_llm_quant.py`` checks them against
independent computations (GPTQ against column-by-column least squares on the calibration inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: smallest fp16 subnormal: scales are clamped to it so an all-zero group stays representable
MIN_SCALE = 2.0 ** -24


@dataclass
class Quantized:
    """A quantized weight: ``codes`` (int64, ``[out, in]``, in ``[0, 2^bits)``), ``scale`` and
    ``zero`` (``[out, in // group_size]``), and its ``bits`` / ``group_size`` / ``symmetric``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        """``(u - z)·s`` as fp32, ``[out, in]``."""
        g = self.group_size
        z = self.zero.repeat_interleave(g, 1).to(torch.float32)
        s = self.scale.to(torch.float32).repeat_interleave(g, 1)
        return (self.codes.to(torch.float32) - z) * s


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-rounded, fp32) and zero point (int64) of each row of ``w [..., g]``."""
    maxq = (1 << bits) - 1
    w = w.to(torch.float32)
    if symmetric:
        scale = 2 * w.abs().amax(-1) / maxq
        zero = torch.full(scale.shape, (maxq + 1) // 2, dtype=torch.int64)
        return scale.clamp(min=MIN_SCALE).half().float(), zero
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=MIN_SCALE).half().float()
    zero = torch.round(-lo / scale).clamp(0, maxq).to(torch.int64)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w / s) + z, 0, 2^b - 1)`` (``scale``/``zero`` broadcast against ``w``)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1).to(torch.int64)


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> Quantized:
    """Round-to-nearest of ``w [out, in]`` on its group grids."""
    out, n = w.shape
    groups = w.detach().to(torch.float32).reshape(out, n // group_size, group_size)
    scale, zero = group_params(groups, bits, symmetric)
    codes = quantize_codes(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).reshape(out, n)
    return Quantized(codes, scale, zero, bits, group_size, symmetric)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)^-1``, ``λ = damp · mean(diag H)`` (GPTQ, Step 3)."""
    h = h.clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool,
         damp: float = 0.01, act_order: bool = False, block_size: int = 128) -> Quantized:
    """GPTQ (Frantar et al. 2023, Algorithm 1) of ``w [out, in]`` with the layer Hessian
    ``H = 2XᵀX/n`` (``[in, in]``): columns are quantized one at a time, and each column's
    error, divided by the diagonal of the upper Cholesky factor of ``H^-1``, is spread over the
    not yet quantized columns (exactly the OBS update). Updates inside a ``block_size`` block are
    applied at once per column, to later blocks lazily per block ("lazy batch updates").

    ``damp``: λ as a fraction of the mean diagonal. Dead inputs (``H_jj = 0``) are zeroed.
    Weights that are exactly zero (a pruned student) stay zero: their code is ``z`` and their
    value is compensated by the other columns, as in SparseGPT.

    Groups: with ``act_order=false`` a group's scale and zero come from its columns' values
    *after* the updates of the columns before it (the reference implementation's default); with
    ``act_order=true`` (columns in decreasing ``H_jj`` order) they come from the original weights
    ("static groups"), so the stored layout keeps groups in input order and needs no index.
    The block size is rounded down to a multiple of ``group_size`` (at least one group; the whole
    row per output channel) so a group's columns are all updated when its grid is chosen.
    """
    out, n = w.shape
    w = w.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    keep = w != 0
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    g = group_size
    n_groups = n // g
    scale = torch.empty(out, n_groups)
    zero = torch.empty(out, n_groups, dtype=torch.int64)
    if act_order:
        scale, zero = group_params(w.reshape(out, n_groups, g), bits, symmetric)
        perm = torch.argsort(h.diagonal(), descending=True)
    else:
        perm = torch.arange(n)
    w, h, keep = w[:, perm], h[perm][:, perm], keep[:, perm]
    hinv = _inverse_hessian_factor(h, damp)
    block = max(g, (block_size // g) * g) if g < n else n
    codes = torch.empty(out, n, dtype=torch.int64)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1, dtype=w.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not act_order and col % g == 0:
                s, z = group_params(w1[:, i:i + g], bits, symmetric)
                scale[:, grp], zero[:, grp] = s, z
            s, z = scale[:, grp].to(w.dtype), zero[:, grp]
            c = quantize_codes(w1[:, i], s, z, bits)
            c = torch.where(keep[:, i1 + i], c, z)
            codes[:, i1 + i] = c
            q = (c - z).to(w.dtype) * s
            e = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return Quantized(codes[:, inverse], scale, zero, bits, group_size, symmetric)


def output_error(delta: torch.Tensor, xtx: torch.Tensor) -> float:
    """``Σ_rows ||ΔW x||²`` over the calibration rows, from ``XᵀX``: ``tr(ΔW XᵀX ΔWᵀ)``."""
    d = delta.to(torch.float64)
    return float(((d @ xtx.to(torch.float64)) * d).sum())
