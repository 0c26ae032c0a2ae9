"""``compresslab.weight_only/1``: Linear weights quantized weight-only by torchao
(``quant=weight_only``, :mod:`compresslab.compress.quant.weight_only`), stored packed.

Each quantized weight is stored as plain tensors: its integer codes (int8 as ``int8``; int4 as
two codes per byte, :func:`~compresslab.compress.codecs.bitpack.pack_bits` of ``code + 8``), its
per-group (or per-channel) fp32 scales and, when the mapping is asymmetric, its zero points.
No torchao tensor subclass is pickled: :func:`load_payload` builds the model from the arch spec
(and the low-rank plan / pruned shapes of an earlier axis),
loads the dense tensors, and re-creates each weight as the torchao tensor that ``quantize_``
made (``Int8Tensor`` for int8, ``IntxUnpackedToInt8Tensor`` for int4) from the stored codes and
scales, so the loaded model runs torchao's own weight-only Linear path.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from compresslab.artifact import Codec, context_fields
from compresslab.compress.codecs.bitpack import pack_bits, unpack_bits
from compresslab.compress.common import dense_state
from compresslab.errors import CheckpointError
from compresslab.compress.structure import build_structure

FORMAT = "compresslab.weight_only/1"
CODEC = Codec(FORMAT, kind="weight_only", lossless=False,
              onnx_weights="dequantized fp32 (the exporter folds torchao's int8/int4 weight-only tensors into fp32 constants)")
#: torchao tensor types this format stores (bits -> class name), and nothing else
TENSOR_TYPES = {8: "Int8Tensor", 4: "IntxUnpackedToInt8Tensor"}


def _tensor_classes():
    from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor

    return {"Int8Tensor": Int8Tensor, "IntxUnpackedToInt8Tensor": IntxUnpackedToInt8Tensor}


def encode_weight(w: torch.Tensor, bits: int) -> dict[str, Any]:
    """Plain-data record of one torchao weight-only tensor (codes packed to ``bits``)."""
    kind = type(w).__name__
    if kind != TENSOR_TYPES[bits]:
        raise ValueError(f"expected a torchao {TENSOR_TYPES[bits]} weight for {bits}-bit, got {kind}")
    q = w.qdata.detach().cpu()
    zero = getattr(w, "zero_point", None)
    rec = {"type": kind, "shape": [int(s) for s in q.shape], "block_size": [int(b) for b in w.block_size],
           "scale": w.scale.detach().cpu().float().clone(), "bits": int(bits)}
    if bits == 8:
        rec["codes"] = q.to(torch.int8).clone()
    else:
        if int(q.min()) < -8 or int(q.max()) > 7:
            raise ValueError(f"int4 codes outside [-8, 7]: [{int(q.min())}, {int(q.max())}]")
        rec["codes"] = pack_bits(q.to(torch.int64) + 8, 4)
    if zero is not None and bool((zero != 0).any()):
        rec["zero_point"] = zero.detach().cpu().to(torch.int8).clone()
    return rec


def decode_weight(rec: Mapping[str, Any]) -> torch.Tensor:
    """The torchao weight-only tensor of an :func:`encode_weight` record."""
    bits, shape = int(rec["bits"]), [int(s) for s in rec["shape"]]
    kind = rec.get("type")
    if TENSOR_TYPES.get(bits) != kind:
        raise CheckpointError(f"weight_only artifact: {bits}-bit weights must be {TENSOR_TYPES.get(bits)}, got {kind!r}")
    cls = _tensor_classes()[kind]
    n = shape[0] * shape[1]
    block = [int(b) for b in rec["block_size"]]
    scale = rec["scale"].float()
    if len(shape) != 2 or len(block) != 2 or shape[1] % block[1] or tuple(scale.shape) != (shape[0], shape[1] // block[1]):
        raise CheckpointError(f"weight_only artifact: scales {tuple(scale.shape)} do not fit a {shape} weight "
                              f"in blocks {block}")
    if bits == 8:
        codes = rec["codes"].to(torch.int8).reshape(shape)
        return cls(codes, scale, block, torch.float32)
    codes = (unpack_bits(rec["codes"], 4, n) - 8).to(torch.int8).reshape(shape)
    zero = rec.get("zero_point")
    zero = torch.zeros_like(scale, dtype=torch.int8) if zero is None else zero.to(torch.int8)
    return cls(codes, scale, zero, torch.int4, block, torch.float32, None)


def weight_only_payload(model: nn.Module, context: Mapping[str, Any], layers: Sequence[str], bits: int,
                        structure: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None) -> dict:
    """The plain-data artifact of a zoo model whose ``layers`` carry torchao weight-only weights
    (``structure``: :func:`~compresslab.compress.structure.structure_of` the student, when an
    earlier axis factorized or pruned it)."""
    keys = {f"{name}.weight" for name in layers}
    dense = dense_state({k: v for k, v in model.state_dict().items() if k not in keys})
    return {
        **context_fields(FORMAT, context),
        "structure": dict(structure or {}),
        "state_dict": dense,
        "quantized": {name: encode_weight(model.get_submodule(name).weight, bits) for name in layers},
        "meta": dict(meta or {}),
    }


def packed_bytes(weights: Mapping[str, torch.Tensor], bits: int) -> int:
    """Bytes the artifact stores for these torchao weights: packed codes, scales, zero points."""
    total = 0
    for w in weights.values():
        rec = encode_weight(w, bits)
        total += sum(rec[k].numel() * rec[k].element_size() for k in ("codes", "scale", "zero_point") if k in rec)
    return total


def quantized_skeleton(payload: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                       shapes: Mapping[str, Sequence[int]], label: str) -> nn.Module:
    """The payload's model (arch spec + structure) with ``state`` loaded, each Linear named in
    ``shapes`` checked to have that weight shape (its quantized weight is the caller's to set)."""
    model = build_structure(payload["arch"], payload["input_shape"], payload["num_classes"],
                            payload.get("structure"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = sorted(set(missing) - {f"{name}.weight" for name in shapes})
    if left or unexpected:
        raise CheckpointError(f"{label} artifact does not match its architecture: missing {left[:4]}, "
                              f"unexpected {list(unexpected)[:4]}")
    for name, shape in shapes.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) or list(module.weight.shape) != [int(s) for s in shape]:
            raise CheckpointError(f"{label} artifact: {name} is not a Linear of shape {list(shape)}")
    return model


def load_payload(payload: Mapping[str, Any]) -> nn.Module:
    """Rebuild the model of a :data:`FORMAT` payload with torchao weight-only Linear weights."""
    quantized = payload["quantized"]
    model = quantized_skeleton(payload, payload["state_dict"], {n: r["shape"] for n, r in quantized.items()},
                               "weight_only")
    for name, rec in quantized.items():
        model.get_submodule(name).weight = nn.Parameter(decode_weight(rec), requires_grad=False)
    return model.eval()
