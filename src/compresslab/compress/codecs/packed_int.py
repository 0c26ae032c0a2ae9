"""``compresslab.packed_int/1``: group-wise 2..8-bit Linear weights of the LLM quantization methods
(``quant=rtn|gptq|awq|smoothquant``, :mod:`compresslab.compress.quant.llm`), stored packed.

Per quantized Linear, plain tensors only: its unsigned codes bit-packed at ``bits`` bits each
(:func:`~compresslab.compress.codecs.bitpack.pack_bits`: int4 two per byte, int3 eight per three
bytes, int2 four per byte), its per-group scales as fp16, its zero points packed at ``bits`` bits
when asymmetric (symmetric: ``2^(bits-1)``, not stored), an optional per-input-channel
``input_scale`` (AWQ / SmoothQuant smoothing that could not be folded into the layer before: the
input is multiplied by it at run time) and ``act`` (``int8_dynamic_per_token`` for SmoothQuant's
W8A8). Codes equal to the zero point (pruned weights, and any weight that rounds to 0) are dropped
through the shared sparse layer (:func:`~.sparse.split_zeros`, bitmask + the other codes) when
that is smaller; the other tensors go through :func:`~.sparse.pack_state`.

Why not safetensors / compressed-tensors: this project's artifact contract is one ``torch.save``
of plain data read with ``weights_only=True`` and dispatched through ``ARTIFACT_LOADERS``, with the
arch spec, the structure of earlier axes and the shared sparse layer in the same payload; a
safetensors file would need a second container beside it for those. The fields are the ones
compressed-tensors' ``pack-quantized`` format has (packed codes, ``weight_scale``,
``weight_zero_point``, group size; no ``g_idx``, since act-order GPTQ here uses static groups in
input order), but packed at exactly ``bits`` bits per code instead of into int32 words.

:func:`load_payload` rebuilds the model from its arch spec and gives each quantized Linear a
torchao tensor made from the stored codes: ``IntxUnpackedToInt8Tensor`` (weight-only; torchao
dequantizes and runs an fp32 matmul on CPU) or, for W8A8, ``Int8Tensor`` with per-token dynamic
int8 activations (torchao's int8 x int8 matmul).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from compresslab.artifact import Codec, context_fields
from compresslab.compress.codecs.bitpack import pack_bits, unpack_bits
from compresslab.compress.codecs.sparse import merge_zeros, pack_state, split_zeros, unpack_state
from compresslab.compress.codecs.weight_only import quantized_skeleton
from compresslab.compress.quant.grid import Quantized
from compresslab.errors import CheckpointError

FORMAT = "compresslab.packed_int/1"
CODEC = Codec(FORMAT, kind="packed_int", lossless=False,
              onnx_weights="dequantized fp32 (the exporter folds torchao's weight tensors into fp32 constants)")
ACT_KINDS = ("none", "int8_dynamic_per_token")
_INTX_DTYPES = {2: torch.int2, 3: torch.int3, 4: torch.int4, 5: torch.int5, 6: torch.int6, 7: torch.int7, 8: torch.int8}


def encode_layer(q: Quantized, input_scale: torch.Tensor | None = None, act: str = "none") -> dict[str, Any]:
    """Plain-data record of one quantized Linear weight."""
    out, n = q.codes.shape
    bits, g = int(q.bits), int(q.group_size)
    zero_full = q.zero.repeat_interleave(g, 1)
    marked = torch.where(q.codes == zero_full, -1, q.codes)
    mask, kept = split_zeros(marked, -1)
    dense = pack_bits(q.codes, bits)
    rec: dict[str, Any] = {"shape": [out, n], "bits": bits, "group_size": g, "symmetric": bool(q.symmetric),
                           "scale": q.scale.to(torch.float16).clone(), "act": act}
    sparse = pack_bits(kept, bits)
    if mask.numel() + sparse.numel() < dense.numel():
        rec.update(codes=torch.cat([mask, sparse]), zeros_dropped=True, mask_bytes=int(mask.numel()),
                   n_kept=int(kept.numel()))
    else:
        rec["codes"] = dense
    if not q.symmetric:
        rec["zero"] = pack_bits(q.zero, bits)
    if input_scale is not None:
        rec["input_scale"] = input_scale.detach().cpu().float().clone()
    return rec


def decode_layer(rec: Mapping[str, Any]) -> Quantized:
    """The :class:`~compresslab.compress.quant.grid.Quantized` weight of an :func:`encode_layer` record."""
    (out, n), bits, g = [int(v) for v in rec["shape"]], int(rec["bits"]), int(rec["group_size"])
    if bits not in _INTX_DTYPES or g < 1 or n % g:
        raise CheckpointError(f"packed_int artifact: bad layer record (bits={bits}, group_size={g}, shape={[out, n]})")
    scale = rec["scale"].float()
    if tuple(scale.shape) != (out, n // g):
        raise CheckpointError(f"packed_int artifact: scales {tuple(scale.shape)} do not fit a {[out, n]} weight "
                              f"in groups of {g}")
    if rec.get("symmetric"):
        zero = torch.full(scale.shape, 1 << (bits - 1), dtype=torch.int64)
    else:
        zero = unpack_bits(rec["zero"], bits, scale.numel()).reshape(scale.shape)
    if rec.get("zeros_dropped"):
        m = int(rec["mask_bytes"])
        kept = unpack_bits(rec["codes"][m:], bits, int(rec["n_kept"]))
        marked = merge_zeros(rec["codes"][:m], kept, out * n, -1).reshape(out, n)
        codes = torch.where(marked == -1, zero.repeat_interleave(g, 1), marked)
    else:
        codes = unpack_bits(rec["codes"], bits, out * n).reshape(out, n)
    return Quantized(codes, scale, zero, bits, g, bool(rec.get("symmetric")))


def layer_bytes(rec: Mapping[str, Any]) -> int:
    """Bytes a layer record stores (codes, scales, zero points, input scale)."""
    return sum(rec[k].numel() * rec[k].element_size() for k in ("codes", "scale", "zero", "input_scale") if k in rec)


class InputScale:
    """Forward pre-hook multiplying a Linear's input by a per-channel vector (unfolded smoothing)."""

    def __init__(self, scale: torch.Tensor) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (args[0] * self.scale.to(args[0].dtype),) + tuple(args[1:])


def torchao_weight(q: Quantized, act: str) -> torch.Tensor:
    """The torchao tensor computing with ``q``: W8A8 ``Int8Tensor`` or weight-only ``IntxUnpackedToInt8Tensor``."""
    from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor, PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

    half = 1 << (q.bits - 1)
    qdata = (q.codes - half).to(torch.int8)
    block = [1, q.group_size]
    if act == "int8_dynamic_per_token":
        if q.bits != 8 or not q.symmetric or q.group_size != q.codes.shape[1]:
            raise CheckpointError("packed_int artifact: W8A8 layers must be symmetric 8-bit per output channel")
        return Int8Tensor(qdata, q.scale.float(), block, torch.float32,
                          act_quant_kwargs=QuantizeTensorToInt8Kwargs(granularity=PerRow()))
    if act != "none":
        raise CheckpointError(f"packed_int artifact: unknown activation kind {act!r} (known: {ACT_KINDS})")
    return IntxUnpackedToInt8Tensor(qdata, q.scale.float(), (q.zero - half).to(torch.int8), _INTX_DTYPES[q.bits],
                                    block, torch.float32, None)


def attach(module: nn.Module, q: Quantized, act: str = "none", input_scale: torch.Tensor | None = None) -> None:
    """Give ``module`` (an ``nn.Linear``) the torchao weight of ``q`` and its input scale hook."""
    module.weight = nn.Parameter(torchao_weight(q, act), requires_grad=False)
    if input_scale is not None:
        module.register_forward_pre_hook(InputScale(input_scale.float()))


def packed_int_payload(model: nn.Module, context: Mapping[str, Any], layers: Mapping[str, dict],
                       structure: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None) -> dict:
    """The plain-data artifact of a zoo model whose ``layers`` (name -> :func:`encode_layer` record)
    are stored packed; every other tensor of its state dict goes through the shared sparse layer."""
    keys = {f"{name}.weight" for name in layers}
    rest = {k: v for k, v in model.state_dict().items() if k not in keys}
    return {**context_fields(FORMAT, context), "structure": dict(structure or {}), "dense": pack_state(rest),
            "layers": dict(layers), "meta": dict(meta or {})}


def load_payload(payload: Mapping[str, Any]) -> nn.Module:
    """Rebuild the model of a :data:`FORMAT` payload with torchao weights on its quantized Linears."""
    layers = payload["layers"]
    model = quantized_skeleton(payload, unpack_state(payload["dense"]), {n: r["shape"] for n, r in layers.items()},
                               "packed_int")
    for name, rec in layers.items():
        attach(model.get_submodule(name), decode_layer(rec), rec.get("act", "none"), rec.get("input_scale"))
    return model.eval()


def summary(layers: Mapping[str, dict], fp32_bytes: int) -> dict[str, Any]:
    """Size figures of the quantized Linears: fp32 bytes, stored bytes and their ratio, bits per weight."""
    stored = sum(layer_bytes(r) for r in layers.values())
    n = sum(math.prod(int(s) for s in r["shape"]) for r in layers.values())
    return {"linear_fp32_bytes": int(fp32_bytes), "linear_packed_bytes": int(stored),
            "linear_packed_vs_fp32": stored / max(1, fp32_bytes), "bits_per_weight": 8 * stored / max(1, n),
            "zeros_dropped_layers": sorted(k for k, r in layers.items() if r.get("zeros_dropped"))}

