"""A real sparse encoding for pruned weights: bitmask or index + nonzero values, then compressed.

Storing a pruned network as a dense fp32 state dict full of zeros saves nothing on
disk. This module encodes every tensor of a state dict with the smallest of three
layouts (Han et al., "Deep Compression", ICLR 2016, store pruned layers as
index + value pairs; a bitmask is the cheaper layout below ~94% sparsity):

- ``dense``   — the raw bytes (ints, BN buffers, the classifier, anything not sparse);
- ``bitmask`` — one bit per element (``numpy.packbits``) + the nonzero values;
- ``index``   — the flat positions of the nonzeros (smallest unsigned int dtype that fits) + values.

All layouts are concatenated into one byte string, optionally compressed with
``lzma`` or ``zlib``, and stored as a single ``uint8`` tensor next to a plain-data
index, so the artifact loads with ``torch.load(weights_only=True)``. "Zero" means
a bit pattern of all zeros, so ``-0.0`` and NaNs are kept as values and decoding is
bit-exact for every dtype.

This encoding is **the shared sparse layer** of every codec (:mod:`compresslab.compress.codecs`):
a codec stores the tensors it keeps as they are through :func:`pack_state` / :func:`unpack_state`
(per tensor the smallest layout, no compression, so a dense tensor costs what it did), and a codec
that re-codes weights (bit-packed codes) drops the zero code with :func:`split_zeros` /
:func:`merge_zeros` (the bitmask layout of a single tensor). So a pruned student's zeros stack
with whichever format claims its artifact.

The artifact format ``compresslab.sparse/1`` (:func:`sparse_payload`) is listed in
:data:`compresslab.artifact.ARTIFACT_LOADERS`; :func:`load_payload` decodes the state
dict and rebuilds the dense model from the arch spec (through ``build_model``, so no
pickled code runs).
"""

from __future__ import annotations

import io
import lzma
import zlib
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from compresslab.compress.codecs.bitpack import DTYPES as _DTYPES
from compresslab.compress.codecs.bitpack import raw_bytes as _raw_bytes
from compresslab.artifact import Codec, spec_fields
from compresslab.models import build_model

FORMAT = "compresslab.sparse/1"
CODEC = Codec(FORMAT, kind="sparse", lossless=True,
              onnx_weights="fp32 dense kernels (ONNX Runtime has no sparse convolution; zeros are "
                           "stored and multiplied)")
ENCODINGS = ("auto", "bitmask", "index", "dense")
COMPRESSIONS = ("lzma", "zlib", "none")

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_INDEX_DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64)


def _from_bytes(buf: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype)[:count].clone()


def nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """Elements whose bit pattern is not all zeros (so ``-0.0`` and NaN count as nonzero)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.clone()
    return flat.view(_SAME_SIZE_INT[flat.element_size()]) != 0


def _index_dtype(numel: int):
    for dt in _INDEX_DTYPES:
        if numel - 1 <= np.iinfo(dt).max:
            return dt
    raise ValueError(f"tensor too large to index: {numel}")


def encoded_sizes(numel: int, nnz: int, itemsize: int) -> dict[str, int]:
    """Bytes each layout needs for a tensor of ``numel`` elements with ``nnz`` nonzeros."""
    idx = np.dtype(_index_dtype(max(numel, 1))).itemsize
    return {
        "dense": numel * itemsize,
        "bitmask": -(-numel // 8) + nnz * itemsize,
        "index": nnz * (idx + itemsize),
    }


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "lzma":
        return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    if compression == "zlib":
        return zlib.compress(data, 9)
    if compression == "none":
        return data
    raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


def _decompress(data: bytes, compression: str) -> bytes:
    if compression == "lzma":
        return lzma.decompress(data)
    if compression == "zlib":
        return zlib.decompress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def encode_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    encoding: str = "auto",
    compression: str = "lzma",
    sparse_keys: Sequence[str] | None = None,
) -> dict:
    """Encode a state dict as plain data: ``{"tensors": [records], "blob": uint8 tensor, ...}``.

    ``encoding="auto"`` picks, per floating-point or int8 tensor (pruned int8 weights), the
    smallest of dense / bitmask / index; ``"bitmask"`` or ``"index"`` force that layout on the
    tensors in ``sparse_keys`` (default: every such tensor with at least one zero). Other
    integer and bool tensors are always stored dense. ``raw_bytes`` is the size before compression.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    wanted = set(sparse_keys) if sparse_keys is not None else None
    out = bytearray()
    records = []
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu()
        dtype_name = str(t.dtype).removeprefix("torch.")
        if dtype_name not in _DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} is not supported by the sparse encoding")
        numel, itemsize = t.numel(), t.element_size()
        rec: dict[str, Any] = {"name": name, "shape": list(t.shape), "dtype": dtype_name, "offset": len(out)}
        layout = "dense"
        if (t.is_floating_point() or t.dtype == torch.int8) and numel > 0 and (wanted is None or name in wanted):
            mask = nonzero_mask(t)
            nnz = int(mask.sum())
            sizes = encoded_sizes(numel, nnz, itemsize)
            if encoding == "auto":
                layout = min(sizes, key=lambda k: (sizes[k], k != "dense"))
            elif encoding != "dense" and (wanted is not None or nnz < numel):
                layout = encoding
        if layout == "dense":
            out += _raw_bytes(t)
        else:
            flat = t.contiguous().reshape(-1)
            values = flat[mask]
            rec["nnz"] = int(values.numel())
            if layout == "bitmask":
                out += np.packbits(mask.numpy(), bitorder="little").tobytes()
            else:
                idx_dt = _index_dtype(numel)
                rec["index_dtype"] = np.dtype(idx_dt).name
                out += np.flatnonzero(mask.numpy()).astype(idx_dt).tobytes()
            out += _raw_bytes(values)
        rec["layout"] = layout
        rec["length"] = len(out) - rec["offset"]
        records.append(rec)
    raw = bytes(out)
    packed = _compress(raw, compression)
    return {
        "tensors": records,
        "blob": torch.frombuffer(bytearray(packed), dtype=torch.uint8).clone() if packed else
        torch.empty(0, dtype=torch.uint8),
        "compression": compression,
        "raw_bytes": len(raw),
    }


def decode_state_dict(encoded: Mapping[str, Any]) -> "OrderedDict[str, torch.Tensor]":
    """Invert :func:`encode_state_dict` exactly (same names, shapes, dtypes and bits)."""
    raw = _decompress(encoded["blob"].numpy().tobytes(), encoded["compression"])
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for rec in encoded["tensors"]:
        if rec["dtype"] not in _DTYPES:
            raise ValueError(f"{rec['name']}: unknown dtype {rec['dtype']!r}")
        dtype = _DTYPES[rec["dtype"]]
        shape = [int(s) for s in rec["shape"]]
        numel = int(np.prod(shape)) if shape else 1
        chunk = raw[rec["offset"]: rec["offset"] + rec["length"]]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if rec["layout"] == "dense":
            state[rec["name"]] = _from_bytes(chunk, dtype, numel).reshape(shape)
            continue
        nnz = int(rec["nnz"])
        if rec["layout"] == "bitmask":
            nmask = -(-numel // 8)
            bits = np.unpackbits(np.frombuffer(chunk[:nmask], dtype=np.uint8), count=numel, bitorder="little")
            positions = torch.from_numpy(np.flatnonzero(bits))
            values = chunk[nmask:]
        elif rec["layout"] == "index":
            idx_dt = np.dtype(rec["index_dtype"])
            if idx_dt.type not in _INDEX_DTYPES:
                raise ValueError(f"{rec['name']}: bad index dtype {idx_dt}")
            nidx = nnz * idx_dt.itemsize
            positions = torch.from_numpy(np.frombuffer(chunk[:nidx], dtype=idx_dt).astype(np.int64))
            values = chunk[nidx:]
        else:
            raise ValueError(f"{rec['name']}: unknown layout {rec['layout']!r}")
        if len(values) != nnz * itemsize or positions.numel() != nnz:
            raise ValueError(f"{rec['name']}: corrupt sparse record")
        flat = torch.zeros(numel, dtype=dtype)
        flat[positions] = _from_bytes(values, dtype, nnz)
        state[rec["name"]] = flat.reshape(shape)
    return state


def pack_state(state: Mapping[str, torch.Tensor]) -> dict:
    """The shared sparse layer: a state dict as a plain-data record, each float / int8 tensor in
    the smallest of the dense / bitmask / index layouts (no compression: dense tensors cost their
    raw bytes). Inverse: :func:`unpack_state`."""
    return encode_state_dict(state, encoding="auto", compression="none")


def unpack_state(stored: Mapping[str, Any]) -> "OrderedDict[str, torch.Tensor]":
    """A state dict from :func:`pack_state`'s record, or a plain ``{name: tensor}`` dict as written
    before the shared layer existed (returned as it is)."""
    if isinstance(stored, Mapping) and isinstance(stored.get("tensors"), list) and "blob" in stored:
        return decode_state_dict(stored)
    return OrderedDict(stored)


def split_zeros(codes: torch.Tensor, zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the elements equal to ``zero`` (the code a zero weight gets) from a flat integer tensor:
    ``(bitmask as uint8 tensor, kept elements)``, the bitmask layout of :func:`encode_state_dict`."""
    flat = codes.detach().cpu().reshape(-1)
    keep = flat != zero
    bits = np.packbits(keep.numpy(), bitorder="little")
    return torch.from_numpy(bits.copy()), flat[keep].clone()


def merge_zeros(bits: torch.Tensor, kept: torch.Tensor, numel: int, zero: int) -> torch.Tensor:
    """Inverse of :func:`split_zeros`: a flat tensor of ``numel`` elements, ``zero`` where dropped."""
    keep = np.unpackbits(bits.numpy(), count=numel, bitorder="little").astype(bool)
    if int(keep.sum()) != kept.numel():
        raise ValueError(f"corrupt sparse codes: the bitmask keeps {int(keep.sum())}, {kept.numel()} stored")
    out = torch.full((numel,), int(zero), dtype=kept.dtype)
    out[torch.from_numpy(keep)] = kept
    return out


def sparse_names(stored: Mapping[str, Any]) -> list[str]:
    """Names of the tensors a :func:`pack_state` record stores in a sparse (bitmask / index) layout."""
    return [rec["name"] for rec in stored.get("tensors", []) if rec.get("layout") in ("bitmask", "index")]


def serialized_size(obj: Any) -> int:
    """Bytes ``torch.save(obj)`` writes (what the artifact file would take)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def sparse_payload(
    model: nn.Module,
    arch: Mapping[str, Any],
    input_shape: Sequence[int],
    num_classes: int,
    encoding: str = "auto",
    compression: str = "lzma",
    sparse_keys: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict:
    """The plain-data artifact payload (format ``compresslab.sparse/1``) of a pruned dense model."""
    enc = encode_state_dict(model.state_dict(), encoding=encoding, compression=compression, sparse_keys=sparse_keys)
    return {
        **spec_fields(FORMAT, arch, input_shape, num_classes),
        **enc,
        "meta": dict(meta or {}),
    }


def load_payload(payload: Mapping[str, Any]) -> nn.Module:
    """Rebuild the dense model of a ``compresslab.sparse/1`` payload (zeros where pruned)."""
    model = build_model(payload["arch"], payload["input_shape"], payload["num_classes"])
    model.load_state_dict(decode_state_dict(payload))
    return model.eval()
