"""Low-bit weight quantization trained with a straight-through estimator, saved bit-packed.

Schemes (``bits``):

- ``8, 4, 3, 2`` — uniform symmetric per-channel (or per-layer) quantization,
  ``q in [-2^(b-1), 2^(b-1)-1]``, ``w ~ s * q``. The scale of each channel is the
  one of a small grid of clipping ratios that minimises the squared quantization error
  (a per-step MSE search, as in the clipping analysis of Banner et al., NeurIPS 2019).
- ``ternary`` — Ternary Weight Networks (Li, Zhang & Liu, arXiv:1605.04711, 2016):
  threshold ``Delta = 0.7 * mean|W|``, ``alpha = mean(|W| where |W| > Delta)``,
  ``w ~ alpha * {-1, 0, +1}``; stored five weights per byte (base 3).
- ``binary`` — scaled sign (BinaryConnect, Courbariaux et al. NeurIPS 2015, with
  XNOR-Net's per-filter scale, Rastegari et al. ECCV 2016): ``w ~ alpha * sign(W)``,
  ``alpha = mean|W|``; one bit per weight.

During training each selected layer computes with its quantized weight; gradients reach
the latent fp32 weight unchanged (straight-through estimator, Bengio et al. 2013).
Activations entering the quantized layers can be fake-quantized too (``act_bits``,
per-tensor asymmetric on an EMA of the observed range). Compute is *simulated*: the
artifact stores packed codes + scales, and :func:`load_lowbit_payload` rebuilds a
working model with the dequantized weights (fp32 kernels).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.bitpack import (
    dtype_from_name,
    dtype_name,
    flatten_state,
    pack_bits,
    pack_trits,
    unflatten_state,
    unpack_bits,
    unpack_trits,
)
from compresslab.compress.quantization.layers import (
    SwapHooks,
    build_structure,
    fake_quant_affine,
    hide_epoch_from_selection,
    quantizable_layers,
    restore_forward,
    ste,
    structure_of,
    swap_forward,
)
from compresslab.errors import CheckpointError, ConfigError

LOWBIT_FORMAT = "compresslab.lowbit/1"
SCHEMES = ("uniform", "ternary", "binary")
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


def pack_codes(codes: torch.Tensor, scheme: str, bits: int) -> torch.Tensor:
    """Bit-pack codes: base-3 for ternary (1.6 bits/weight), ``bits`` bits otherwise."""
    return pack_trits(codes) if scheme == "ternary" else pack_bits(codes, bits)


def unpack_codes(packed: torch.Tensor, scheme: str, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    return unpack_trits(packed, n) if scheme == "ternary" else unpack_bits(packed, bits, n)


class _LowBitState:
    """What the swapped forward of one layer needs (kept outside the state dict)."""

    def __init__(self, method: "LowBit") -> None:
        self.method = method
        self.act_range: torch.Tensor | None = None  # [lo, hi, initialised]

    def weight(self, module: nn.Module, w: torch.Tensor) -> torch.Tensor:
        m = self.method
        if not m.active:
            return w
        _, _, deq = quantize_weight(w, m.scheme, m.bits, m.per_channel, m.scale_dtype)
        return ste(w, deq.to(w.dtype))

    def input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        m = self.method
        if m.act_bits is None or not m.active:
            return x
        rng = module.lowbit_act_range
        if module.training:
            with torch.no_grad():
                lo, hi = x.detach().min(), x.detach().max()
                if rng[2] == 0:
                    rng.copy_(torch.stack([lo, hi, torch.ones_like(lo)]))
                else:
                    mom = m.act_momentum
                    rng[0].mul_(1 - mom).add_(mom * lo)
                    rng[1].mul_(1 - mom).add_(mom * hi)
        if rng[2] == 0:
            return x
        return fake_quant_affine(x, float(rng[0]), float(rng[1]), m.act_bits)


class LowBitCallback(Callback):
    """Turns the low-bit forward on from ``start_epoch``; earlier epochs are not eligible
    as the val-selected checkpoint."""

    def __init__(self, method: "LowBit") -> None:
        self.method = method

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.method.active = trainer.current_epoch >= self.method.start_epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.method.start_epoch:
            hide_epoch_from_selection(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.method.active = trainer.current_epoch >= self.method.start_epoch


class LowBit(CompressionMethod):
    """Low-bit (8/4/3/2-bit uniform, ternary, binary) weights with STE training; bit-packed artifact."""

    def __init__(self, name: str, bits: Any = 4, per_channel: bool = True, scale_dtype: str = "float16",
                 act_bits: int | None = None, act_momentum: float = 0.1, keep_first_last: bool = False,
                 exclude: Sequence[str] = (), start_epoch: int = 0) -> None:
        super().__init__(name)
        self.scheme, self.bits = parse_bits(bits)
        self.per_channel = bool(per_channel)
        if scale_dtype not in ("float16", "float32"):
            raise ConfigError(f"quant.scale_dtype must be float16 or float32, got {scale_dtype!r}")
        self.scale_dtype = dtype_from_name(scale_dtype)
        if act_bits is not None and not 2 <= int(act_bits) <= 8:
            raise ConfigError(f"quant.act_bits must be null or 2..8, got {act_bits!r}")
        self.act_bits = None if act_bits is None else int(act_bits)
        self.act_momentum = float(act_momentum)
        self.keep_first_last = bool(keep_first_last)
        self.exclude = list(exclude)
        self.start_epoch = int(start_epoch)
        self.active = self.start_epoch <= 0
        self.layer_names: list[str] = []
        self._report: dict[str, Any] = {}

    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        layers = quantizable_layers(student, self.exclude, self.keep_first_last)
        if not layers:
            raise ConfigError(f"quant={self.name}: the student has no conv/linear layer to quantize")
        self.layer_names = list(layers)
        for module in layers.values():
            state = _LowBitState(self)
            if self.act_bits is not None:
                module.register_buffer("lowbit_act_range", torch.zeros(3))
            swap_forward(module, SwapHooks(weight=state.weight, input=state.input))
        return student

    def callbacks(self) -> list[Callback]:
        return [LowBitCallback(self)]

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        self.active = True
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict:
        # re-resolved on the final student (a low-rank method may have replaced layers since prepare)
        names = list(quantizable_layers(student, self.exclude, self.keep_first_last))
        payload, stats = encode_lowbit(student, names, self.scheme, self.bits, self.per_channel,
                                       self.scale_dtype, self.act_bits, context)
        self._report = stats
        return payload

    def report(self) -> dict[str, Any]:
        return dict(self._report)


def encode_lowbit(student: nn.Module, layer_names: Sequence[str], scheme: str, bits: int, per_channel: bool,
                  scale_dtype: torch.dtype, act_bits: int | None, context: dict[str, Any]) -> tuple[dict, dict]:
    """The bit-packed payload of ``student`` and its size statistics."""
    modules = dict(student.named_modules())
    blobs, scales, layers, act = [], [], [], {}
    code_offset = scale_offset = 0
    fp32_bytes = enc_bytes = n_weights = 0
    quantized_keys = set()
    per_layer = {}
    for name in layer_names:
        module = modules[name]
        w = module.weight.detach().cpu()
        codes, scale, _ = quantize_weight(w, scheme, bits, per_channel, scale_dtype)
        packed = pack_codes(codes, scheme, bits)
        blobs.append(packed)
        scales.append(scale.float())
        layers.append({"name": name, "shape": [int(s) for s in w.shape], "code_offset": code_offset,
                       "code_bytes": int(packed.numel()), "scale_offset": scale_offset,
                       "n_scales": int(scale.numel()), "scale_dtype": dtype_name(scale.dtype)})
        code_offset += packed.numel()
        scale_offset += scale.numel()
        layer_enc = packed.numel() + scale.numel() * scale.element_size()
        fp32_bytes += w.numel() * 4
        enc_bytes += layer_enc
        n_weights += w.numel()
        per_layer[name] = round(w.numel() * 4 / layer_enc, 3)
        quantized_keys.add(f"{name}.weight")
        if act_bits is not None and hasattr(module, "lowbit_act_range"):
            act[name] = [float(v) for v in module.lowbit_act_range[:2]]
    rest = {k: v for k, v in student.state_dict().items()
            if k not in quantized_keys and not k.endswith("lowbit_act_range")}
    dense_blobs, dense_index = flatten_state(rest)
    scale_blob = torch.cat(scales) if scales else torch.empty(0)
    # scales are stored in the narrowest dtype every layer accepted
    all_half = all(layer["scale_dtype"] == "float16" for layer in layers)
    payload = {
        "format": LOWBIT_FORMAT,
        "arch": dict(context["arch"]),
        "input_shape": [int(v) for v in context["input_shape"]],
        "num_classes": int(context["num_classes"]),
        "structure": structure_of(student, context),
        "scheme": scheme,
        "bits": int(bits),
        "per_channel": bool(per_channel),
        "codes": torch.cat(blobs) if blobs else torch.empty(0, dtype=torch.uint8),
        "scales": scale_blob.to(torch.float16 if all_half else torch.float32),
        "layers": layers,
        "act_bits": act_bits,
        "act_ranges": act,
        "dense": dense_blobs,
        "dense_index": dense_index,
    }
    bits_per_weight = 8 * enc_bytes / max(1, n_weights)
    stats = {
        "quant_method": "lowbit",
        "quant_scheme": scheme if scheme != "uniform" else f"uniform{bits}",
        "quant_backend": "bitpacked_dequantized_fp32",
        "compute": "simulated",
        "fallback_reason": None,
        "lowbit_layers": len(layers),
        "lowbit_bits_per_weight": bits_per_weight,
        "quantized_layers_fp32_bytes": fp32_bytes,
        "quantized_layers_encoded_bytes": enc_bytes,
        "size_ratio_quantized_layers": fp32_bytes / enc_bytes if enc_bytes else None,
        "size_ratio_per_layer": per_layer,
        "act_bits": act_bits,
    }
    return payload, stats


def load_lowbit_payload(payload: dict) -> nn.Module:
    """Rebuild a working (dequantized, fp32-compute) model from a :data:`LOWBIT_FORMAT` payload."""
    model = build_structure(payload["arch"], payload["input_shape"], payload["num_classes"],
                            payload.get("structure"))
    scheme, bits = payload["scheme"], int(payload["bits"])
    state = unflatten_state(payload["dense"], payload["dense_index"])
    codes_all, scales_all = payload["codes"], payload["scales"]
    for layer in payload["layers"]:
        shape = layer["shape"]
        n = math.prod(shape)
        packed = codes_all[layer["code_offset"]: layer["code_offset"] + layer["code_bytes"]]
        scale = scales_all[layer["scale_offset"]: layer["scale_offset"] + layer["n_scales"]]
        scale = scale.to(dtype_from_name(layer["scale_dtype"]))
        codes = unpack_codes(packed, scheme, bits, n)
        state[f"{layer['name']}.weight"] = dequantize_codes(codes, scale, scheme, bits, shape)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"low-bit artifact does not match its architecture: {exc}") from exc
    act_bits = payload.get("act_bits")
    if act_bits is not None:
        modules = dict(model.named_modules())
        for name, (lo, hi) in payload.get("act_ranges", {}).items():
            swap_forward(modules[name], SwapHooks(
                input=lambda mod, x, lo=lo, hi=hi: fake_quant_affine(x, lo, hi, int(act_bits))))
    return model.eval()


def strip_lowbit(student: nn.Module) -> nn.Module:
    """Return the student's layers to their plain forward (drops the activation-range buffers)."""
    for module in student.modules():
        restore_forward(module)
        if "lowbit_act_range" in module._buffers:
            del module._buffers["lowbit_act_range"]
    return student
