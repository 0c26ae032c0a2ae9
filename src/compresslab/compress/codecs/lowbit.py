"""``compresslab.lowbit/1``: low-bit weights (``quant=lowbit``; the weight-only int8 fallback of
``ptq_int8``) as bit-packed codes + per-channel scales.

Each quantized layer's codes (:func:`~compresslab.compress.quant.quantizers.quantize_weight`) are
packed at ``bits`` bits per weight (ternary: five weights per byte, base 3), its scales stored
in fp16 when every layer's scales fit, fp32 otherwise; the other tensors (BN, biases, layers
left out) are stored as they are, one flat tensor per dtype. :func:`load_payload` rebuilds a
working model with the dequantized weights (fp32 kernels: compute is simulated) and, when
activations were quantized, their fake-quantizers.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from compresslab.compress.codecs.bitpack import (
    dtype_from_name,
    dtype_name,
    pack_bits,
    pack_trits,
    unflatten_state,
    unpack_bits,
    unpack_trits,
)
from compresslab.artifact import Codec, OnnxRequest, context_fields, model_from_payload
from compresslab.compress.codecs.sparse import merge_zeros, pack_state, split_zeros, unpack_state
from compresslab.compress.common import fake_quant_affine
from compresslab.compress.quant.quantizers import dequantize_codes, quantize_weight
from compresslab.compress.structure import build_structure, structure_of
from compresslab.compress.quant.swap import SwapHooks, swap_forward
from compresslab.errors import CheckpointError

FORMAT = "compresslab.lowbit/1"


def pack_codes(codes: torch.Tensor, scheme: str, bits: int) -> torch.Tensor:
    """Bit-pack codes: base-3 for ternary (1.6 bits/weight), ``bits`` bits otherwise."""
    return pack_trits(codes) if scheme == "ternary" else pack_bits(codes, bits)


def unpack_codes(packed: torch.Tensor, scheme: str, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    return unpack_trits(packed, n) if scheme == "ternary" else unpack_bits(packed, bits, n)


def zero_code(scheme: str, bits: int) -> int | None:
    """The code a zero weight gets (:func:`~compresslab.compress.quant.quantizers.quantize_weight`);
    None for binary, which has no zero (sign(0) = +1): its codes cannot drop a pruned weight."""
    return {"uniform": 1 << (bits - 1), "ternary": 1}.get(scheme)


def _pack_layer(codes: torch.Tensor, scheme: str, bits: int) -> tuple[torch.Tensor, dict]:
    """The layer's packed codes, with the zero codes dropped through the shared sparse layer
    (:func:`~compresslab.compress.codecs.sparse.split_zeros`: bitmask + the other codes) when that
    is smaller, so a pruned student's zeros stack with the low-bit codes."""
    packed = pack_codes(codes, scheme, bits)
    zero = zero_code(scheme, bits)
    if zero is None:
        return packed, {}
    mask, kept = split_zeros(codes, zero)
    sparse = pack_codes(kept, scheme, bits)
    if mask.numel() + sparse.numel() >= packed.numel():
        return packed, {}
    return torch.cat([mask, sparse]), {"zeros_dropped": True, "mask_bytes": int(mask.numel()),
                                       "n_kept": int(kept.numel())}


def _unpack_layer(packed: torch.Tensor, layer: dict, scheme: str, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_layer`."""
    if not layer.get("zeros_dropped"):
        return unpack_codes(packed, scheme, bits, n)
    m = int(layer["mask_bytes"])
    kept = unpack_codes(packed[m:], scheme, bits, int(layer["n_kept"]))
    return merge_zeros(packed[:m], kept, n, zero_code(scheme, bits))



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
        packed, sparse = _pack_layer(codes, scheme, bits)
        blobs.append(packed)
        scales.append(scale.float())
        layers.append({"name": name, "shape": [int(s) for s in w.shape], "code_offset": code_offset,
                       "code_bytes": int(packed.numel()), "scale_offset": scale_offset,
                       "n_scales": int(scale.numel()), "scale_dtype": dtype_name(scale.dtype), **sparse})
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
    scale_blob = torch.cat(scales) if scales else torch.empty(0)
    # scales are stored in the narrowest dtype every layer accepted
    all_half = all(layer["scale_dtype"] == "float16" for layer in layers)
    payload = {
        **context_fields(FORMAT, context),
        "structure": structure_of(student, context),
        "scheme": scheme,
        "bits": int(bits),
        "per_channel": bool(per_channel),
        "codes": torch.cat(blobs) if blobs else torch.empty(0, dtype=torch.uint8),
        "scales": scale_blob.to(torch.float16 if all_half else torch.float32),
        "layers": layers,
        "act_bits": act_bits,
        "act_ranges": act,
        "dense": pack_state(rest),
    }
    bits_per_weight = 8 * enc_bytes / max(1, n_weights)
    stats = {
        "scheme": scheme if scheme != "uniform" else f"uniform{bits}",
        "backend": "bitpacked_dequantized_fp32",
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


def load_payload(payload: dict) -> nn.Module:
    """Rebuild a working (dequantized, fp32-compute) model from a :data:`FORMAT` payload."""
    model = build_structure(payload["arch"], payload["input_shape"], payload["num_classes"],
                            payload.get("structure"))
    scheme, bits = payload["scheme"], int(payload["bits"])
    if "dense_index" in payload:  # files written before the shared sparse layer
        state = unflatten_state(payload["dense"], payload["dense_index"])
    else:
        state = dict(unpack_state(payload["dense"]))
    codes_all, scales_all = payload["codes"], payload["scales"]
    for layer in payload["layers"]:
        shape = layer["shape"]
        n = math.prod(shape)
        packed = codes_all[layer["code_offset"]: layer["code_offset"] + layer["code_bytes"]]
        scale = scales_all[layer["scale_offset"]: layer["scale_offset"] + layer["n_scales"]]
        scale = scale.to(dtype_from_name(layer["scale_dtype"]))
        codes = _unpack_layer(packed, layer, scheme, bits, n)
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


def lowbit_onnx_form(payload: Mapping[str, Any], request: OnnxRequest) -> tuple[bytes, dict]:
    """The loaded module, exported as it computes; with fake-quantized activations (``act_bits``) the
    rounding at those points can differ by one step between runtimes, so the form is not lossless."""
    from compresslab.runtime.onnx_export import onnx_bytes

    data = onnx_bytes(model_from_payload(payload), request.example, request.opset)
    if payload.get("act_bits") is None:
        return data, {}
    return data, {"lossless": False,
                  "weights": f"{CODEC.onnx_weights}; activations fake-quantized to {payload['act_bits']} bits"}


CODEC = Codec(FORMAT, kind="lowbit", lossless=True, onnx_weights="dequantized fp32 (no packed low-bit form in ONNX "
              "Runtime)", onnx_form=lowbit_onnx_form)
