"""The quantizer formulas of the low-bit methods, as pure functions: what the methods compute
with during training and what their artifacts store (the tests compare them with the papers).

- ``quant=lowbit`` (:mod:`compresslab.compress.quant.lowbit`): uniform symmetric per-channel
  quantization with an MSE-searched clipping scale (Banner et al., NeurIPS 2019), ternary
  (TWN, Li, Zhang & Liu 2016), binary (BinaryConnect / XNOR-Net scale):
  :func:`quantize_weight` / :func:`dequantize_codes`.
- ``quant=lsq`` / ``quant=pact`` (:mod:`compresslab.compress.quant.lsq_pact`): LSQ (Esser et al.,
  ICLR 2020) :func:`lsq_quantize`, PACT (Choi et al. 2018) :func:`pact_quantize` and DoReFa
  weights (Zhou et al. 2016) :func:`dorefa_quantize`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from compresslab.errors import ConfigError

LOWBIT_SCHEMES = ("uniform", "ternary", "binary")
UNIFORM_BITS = (2, 3, 4, 5, 6, 7, 8)
#: clipping ratios searched for the uniform scheme's per-channel scale
_CLIP_GRID = torch.linspace(0.3, 1.0, 15)
#: TWN's threshold factor (Li et al. 2016, Eq. 9 approximation)
TWN_DELTA = 0.7


def parse_bits(bits: Any) -> tuple[str, int]:
    """``bits`` config value -> (scheme, stored bits per weight): 4 -> ("uniform", 4),
    "ternary" -> ("ternary", 2), "binary" -> ("binary", 1)."""
    if isinstance(bits, str) and not bits.isdigit():
        key = bits.lower()
        if key == "ternary":
            return "ternary", 2
        if key == "binary":
            return "binary", 1
        raise ConfigError(f"quant.bits must be one of {UNIFORM_BITS}, 'ternary' or 'binary'; got {bits!r}")
    b = int(bits)
    if b not in UNIFORM_BITS:
        raise ConfigError(f"quant.bits must be one of {UNIFORM_BITS}, 'ternary' or 'binary'; got {bits!r}")
    return "uniform", b


def _channels(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def _store_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round scales to their storage dtype (so training, export and reload agree exactly);
    float16 falls back to float32 when a scale would not be representable."""
    if scale_dtype == torch.float16:
        s16 = scale.to(torch.float16)
        if torch.isfinite(s16).all() and bool((s16[scale > 0] >= 6.2e-5).all()):
            return s16
        return scale.to(torch.float32)
    return scale.to(scale_dtype)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scheme: str, bits: int, per_channel: bool = True,
                    scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w``: returns (codes >= 0 as int64 of w's shape, stored scales, dequantized w).

    Codes: uniform ``q + 2^(b-1)``; ternary ``q + 1`` with q in {-1, 0, 1}; binary
    ``(q + 1) / 2`` with q in {-1, +1} (sign(0) = +1).
    """
    w = w.detach().float()
    x = _channels(w, per_channel)
    absx = x.abs()
    if scheme == "uniform":
        half = 1 << (bits - 1)
        amax = absx.amax(1, keepdim=True).clamp_min(1e-12)
        cands = amax.unsqueeze(0) * _CLIP_GRID.view(-1, 1, 1).to(x) / (half - 0.5)  # (K, C, 1)
        q = torch.clamp(torch.round(x.unsqueeze(0) / cands), -half, half - 1)
        err = ((q * cands - x.unsqueeze(0)) ** 2).sum(2)  # (K, C)
        best = err.argmin(0)
        scale = _store_scale(cands[best, torch.arange(x.shape[0])].squeeze(1), scale_dtype)
        sf = scale.float().unsqueeze(1)
        q = torch.clamp(torch.round(x / sf), -half, half - 1)
        codes = (q + half).to(torch.int64)
    elif scheme == "ternary":
        delta = TWN_DELTA * absx.mean(1, keepdim=True)
        keep = absx > delta
        count = keep.sum(1, keepdim=True)
        alpha = torch.where(count > 0, (absx * keep).sum(1, keepdim=True) / count.clamp_min(1),
                            absx.amax(1, keepdim=True))
        scale = _store_scale(alpha.squeeze(1), scale_dtype)
        sf = scale.float().unsqueeze(1)
        q = torch.sign(x) * keep
        codes = (q + 1).to(torch.int64)
    elif scheme == "binary":
        scale = _store_scale(absx.mean(1), scale_dtype)
        sf = scale.float().unsqueeze(1)
        q = torch.where(x >= 0, 1.0, -1.0)
        codes = ((q + 1) / 2).to(torch.int64)
    else:
        raise ConfigError(f"unknown low-bit scheme {scheme!r}")
    deq = (q * sf).reshape(w.shape)
    return codes.reshape(w.shape), scale, deq


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, scheme: str, bits: int,
                     shape: Sequence[int]) -> torch.Tensor:
    """Weights from codes + stored scales (inverse of :func:`quantize_weight`'s encoding)."""
    c = codes.to(torch.float32).reshape(scale.numel(), -1)
    sf = scale.float().unsqueeze(1)
    if scheme == "uniform":
        q = c - (1 << (bits - 1))
    elif scheme == "ternary":
        q = c - 1
    else:
        q = c * 2 - 1
    return (q * sf).reshape(list(shape))



# ---- LSQ / PACT / DoReFa -----------------------------------------------------------------------------
ACT_SCHEMES = ("lsq", "pact")
ACT_BITS = (2, 3, 4, 5, 6, 7, 8)
FP32 = 32  # "bits" of a layer left in fp32


def features_per_sample(x: torch.Tensor) -> int:
    """Input features per sample of a batch ``x`` (LSQ's ``N`` for an activation quantizer)."""
    return x[0].numel() if x.dim() > 1 else x.numel()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass (bit-exact), gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (bit-exact) with the straight-through gradient."""
    return x.detach().round() + (x - x.detach())


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P): signed ``2^(b-1), 2^(b-1)-1``; unsigned ``0, 2^b-1``."""
    return (1 << (bits - 1), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def lsq_quantize(v: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, n: int) -> torch.Tensor:
    """LSQ: ``round(clip(v/s, -Q_N, Q_P)) * s``, step gradient scaled by ``1/sqrt(n Q_P)``."""
    qn, qp = qrange(bits, signed)
    s = grad_scale(step, 1.0 / math.sqrt(max(1, n) * qp))
    return round_ste(torch.clamp(v / s, -qn, qp)) * s


def lsq_init_step(v: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """LSQ's initial step ``2 mean|v| / sqrt(Q_P)``."""
    _, qp = qrange(bits, signed)
    return (2 * v.detach().abs().mean() / math.sqrt(qp)).clamp_min(1e-8)


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """PACT: clip to ``[0, α]`` (signed inputs: ``[−α, α]``) as ``0.5(|x| − |x − α| + α)``, then
    ``round(y (2^b − 1)/α) α/(2^b − 1)`` with the STE through the rounding (Eq. 3: ``∂y_q/∂α = 1``
    where the input was clipped, 0 elsewhere)."""
    if signed:
        y = 0.5 * ((x + alpha).abs() - (x - alpha).abs())
        levels = (1 << (bits - 1)) - 1
    else:
        y = 0.5 * (x.abs() - (x - alpha).abs() + alpha)
        levels = (1 << bits) - 1
    with torch.no_grad():
        q = torch.round(y * levels / alpha) * alpha / levels
    return q + (y - y.detach())


def dorefa_codes(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa weight codes in ``[0, 2^b − 1]``: ``round((2^b − 1)(tanh w / (2 max|tanh w|) + 1/2))``."""
    t = torch.tanh(w.detach())
    levels = (1 << bits) - 1
    return torch.round((t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5) * levels)


def dorefa_from_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``2 c / (2^b − 1) − 1``."""
    return 2 * codes / ((1 << bits) - 1) - 1


def dorefa_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa-quantized weights (bit-exact ``2c/(2^b − 1) − 1``) with the STE through the rounding:
    the gradient is that of ``2 (tanh w / (2 max|tanh w|) + 1/2) − 1``."""
    t = torch.tanh(w)
    soft = t / t.abs().max().detach().clamp_min(1e-12)
    return dorefa_from_codes(dorefa_codes(w, bits), bits) + (soft - soft.detach())

