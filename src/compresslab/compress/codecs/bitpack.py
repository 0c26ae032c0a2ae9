"""Dense bit-packing of small integer codes into bytes.

:func:`pack_bits` stores ``n`` codes of ``bits`` bits each (1..8) in exactly
``ceil(n * bits / 8)`` bytes, least-significant bit first (code ``i`` occupies
stream bits ``i*bits .. i*bits+bits-1``; stream bit ``j`` is bit ``j % 8`` of byte
``j // 8``). :func:`pack_trits` stores base-3 digits five to a byte
(3^5 = 243 <= 256), i.e. 1.6 bits per ternary weight instead of 2.
Both have exact inverses; the packed form is a ``uint8`` tensor, so it can be
saved in a ``weights_only`` artifact.
"""

from __future__ import annotations

import math

import torch


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes :func:`pack_bits` uses for ``n`` codes of ``bits`` bits."""
    return math.ceil(int(n) * int(bits) / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits) into a flat ``uint8`` tensor."""
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: [{int(flat.min())}, {int(flat.max())}]")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # LSB first per code
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64))
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as an ``int64`` tensor."""
    bits = int(bits)
    data = packed.reshape(-1).to(torch.int64)
    stream = ((data.unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)
    need = int(n) * bits
    if stream.numel() < need:
        raise ValueError(f"packed data holds {stream.numel()} bits, {need} needed")
    groups = stream[:need].reshape(int(n), bits)
    return (groups << torch.arange(bits, dtype=torch.int64)).sum(1)


_TRITS_PER_BYTE = 5


def trits_nbytes(n: int) -> int:
    """Bytes :func:`pack_trits` uses for ``n`` base-3 digits."""
    return math.ceil(int(n) / _TRITS_PER_BYTE)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Pack base-3 digits (values 0, 1, 2) five per byte: byte = sum(d_k * 3**k)."""
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 2):
        raise ValueError("trits must be 0, 1 or 2")
    pad = (-flat.numel()) % _TRITS_PER_BYTE
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    powers = 3 ** torch.arange(_TRITS_PER_BYTE, dtype=torch.int64)
    return (flat.reshape(-1, _TRITS_PER_BYTE) * powers).sum(1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: the first ``n`` digits as ``int64``."""
    data = packed.reshape(-1).to(torch.int64)
    powers = 3 ** torch.arange(_TRITS_PER_BYTE, dtype=torch.int64)
    digits = (data.unsqueeze(1) // powers) % 3
    return digits.reshape(-1)[: int(n)]


# ---- compact containers ------------------------------------------------------------------
#: the dtypes artifacts store, by name (names are looked up here, never with getattr on torch)
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool)
}


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16`` (only the dtypes artifacts use; never getattr on torch)."""
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def raw_bytes(t: torch.Tensor) -> bytes:
    """The bytes of ``t``'s elements (C order), whatever its dtype."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def flatten_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[list]]:
    """Concatenate tensors into one flat tensor per dtype (a ``torch.save`` file then holds a
    handful of storages instead of one per tensor). Returns (blobs by dtype name, index of
    ``[name, dtype name, shape, offset]``)."""
    parts: dict[str, list[torch.Tensor]] = {}
    offsets: dict[str, int] = {}
    index = []
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        key = dtype_name(t.dtype)
        off = offsets.get(key, 0)
        parts.setdefault(key, []).append(t.reshape(-1))
        offsets[key] = off + t.numel()
        index.append([name, key, [int(s) for s in t.shape], off])
    blobs = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    return blobs, index


def unflatten_state(blobs: dict[str, torch.Tensor], index: list[list]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_state`."""
    out = {}
    for name, key, shape, off in index:
        n = math.prod(shape) if shape else 1
        out[name] = blobs[key][off: off + n].reshape(shape).clone()
    return out
