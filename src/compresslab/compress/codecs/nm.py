"""``compresslab.nm/1``: an N:M-sparse model (``prune=nm``) stored compactly.

Each N:M layer is stored as cuSPARSELt's compressed form does it: the ``n`` kept values of every
group of ``m`` consecutive weights along the reduction dimension (a dense ``(out, K·n/m)``
tensor) and, per kept value, its position inside the group (``ceil(log2 m)`` bits, bit-packed
with :func:`~compresslab.compress.codecs.bitpack.pack_bits`: 2 bits for 2:4). Every other tensor is
stored dense. :func:`load_payload` checks the positions (``n`` distinct, increasing, < ``m`` per
group), scatters the values back into dense weights and loads them into the model built from the
arch spec: no pickled code, and the pattern is exact by construction.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from compresslab.artifact import Codec, context_fields
from compresslab.compress.codecs.bitpack import pack_bits, unpack_bits
from compresslab.compress.common import dense_state
from compresslab.errors import CheckpointError
from compresslab.models import build_model

FORMAT = "compresslab.nm/1"
CODEC = Codec(FORMAT, kind="nm", lossless=True,
              onnx_weights="fp32 dense kernels (ONNX Runtime has no N:M sparse kernel; zeros are stored and multiplied)")


def index_bits(m: int) -> int:
    """Bits per stored position inside a group of ``m``."""
    return max(1, math.ceil(math.log2(int(m))))


def nm_pattern_ok(w2: torch.Tensor, n: int, m: int) -> bool:
    """Whether the 2-D ``w2`` (out, K) has at most ``n`` nonzeros in every ``m`` consecutive
    entries of each row (K a multiple of ``m``)."""
    if w2.shape[1] % m:
        return False
    return bool(((w2.reshape(w2.shape[0], -1, m) != 0).sum(-1) <= n).all())


def encode_nm(weight: torch.Tensor, n: int, m: int) -> dict[str, Any]:
    """The kept values and packed positions of one N:M weight (positions chosen as the ``n``
    nonzeros of each group, zeros filling a group with fewer)."""
    w2 = weight.detach().cpu().reshape(weight.shape[0], -1)
    if not nm_pattern_ok(w2, n, m):
        raise ValueError(f"weight of shape {tuple(weight.shape)} is not {n}:{m} sparse along its reduction dimension")
    groups = w2.reshape(w2.shape[0], -1, m)
    pos = torch.argsort((groups != 0).to(torch.int8), dim=-1, descending=True, stable=True)[..., :n]
    pos = pos.sort(dim=-1).values
    return {"shape": [int(s) for s in weight.shape], "values": groups.gather(-1, pos).reshape(w2.shape[0], -1).clone(),
            "positions": pack_bits(pos, index_bits(m)), "count": int(pos.numel())}


def decode_nm(rec: Mapping[str, Any], n: int, m: int) -> torch.Tensor:
    """The dense weight of an :func:`encode_nm` record, after checking its positions."""
    shape = [int(s) for s in rec["shape"]]
    rows = shape[0]
    k = math.prod(shape[1:])
    if k % m or rec["count"] != rows * (k // m) * n:
        raise CheckpointError(f"nm artifact: a layer of shape {shape} cannot hold {rec['count']} {n}:{m} positions")
    pos = unpack_bits(rec["positions"], index_bits(m), rec["count"]).reshape(rows, k // m, n)
    if bool((pos >= m).any()) or (n > 1 and bool((pos[..., 1:] <= pos[..., :-1]).any())):
        raise CheckpointError(f"nm artifact: positions of a layer of shape {shape} are not {n} distinct "
                              f"increasing values below {m} per group")
    values = rec["values"].reshape(rows, k // m, n)
    dense = torch.zeros(rows, k // m, m, dtype=values.dtype).scatter_(-1, pos, values)
    return dense.reshape(shape)


def nm_bytes(weights: Mapping[str, torch.Tensor], n: int, m: int) -> dict[str, int]:
    """Bytes the N:M layers take in the artifact: kept values and packed positions."""
    kept = sum(w.numel() * n // m for w in weights.values())
    size = max((w.element_size() for w in weights.values()), default=4)
    return {"nm_values_bytes": kept * size, "nm_index_bytes": math.ceil(kept * index_bits(m) / 8)}


def nm_payload(model: nn.Module, context: Mapping[str, Any], layers: Sequence[str], n: int, m: int,
               meta: Mapping[str, Any] | None = None) -> dict:
    """The plain-data artifact of an N:M-pruned zoo model (its ``layers`` encoded)."""
    state = dense_state(model.state_dict())
    encoded = {}
    for name in layers:
        encoded[name] = encode_nm(state.pop(f"{name}.weight"), n, m)
    return {
        **context_fields(FORMAT, context),
        "n": int(n), "m": int(m),
        "state_dict": state,
        "nm": encoded,
        "meta": dict(meta or {}),
    }


def load_payload(payload: Mapping[str, Any]) -> nn.Module:
    """Rebuild the (dense-running) N:M model of a :data:`FORMAT` payload."""
    model = build_model(payload["arch"], payload["input_shape"], payload["num_classes"])
    n, m = int(payload["n"]), int(payload["m"])
    state = dict(payload["state_dict"])
    for name, rec in payload["nm"].items():
        state[f"{name}.weight"] = decode_nm(rec, n, m)
    model.load_state_dict(state)
    return model.eval()
