"""``compresslab.shared/1``: a weight-shared student (``quant=weight_sharing``), Huffman coded as in
Deep Compression (Han, Mao & Dally, ICLR 2016, stage 3).

Per layer, the cheaper of two layouts: ``sparse``: relative index (the gap of zeros before each
stored weight, capped at ``2^gap_bits - 1`` with filler zero entries, as in the paper's Fig. 2) +
centroid index; ``dense``: a centroid index (or the zero symbol) for every weight. The gap and
index streams are Huffman coded (canonical codes, :mod:`compresslab.compress.codecs.huffman`).
Codebooks are fp32; the tensors that are not shared (biases, BN) are stored in the method's
``unshared_dtype``. Everything is one byte blob, so ``size_bytes`` is the encoded size, and
:func:`load_payload` decodes exactly the model that was evaluated (fp32 compute: simulated).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from compresslab.compress.codecs import huffman
from compresslab.compress.codecs.bitpack import dtype_from_name, dtype_name, raw_bytes
from compresslab.artifact import Codec, context_fields
from compresslab.compress.structure import build_structure, structure_of
from compresslab.errors import CheckpointError

FORMAT = "compresslab.shared/1"

# ---- encoding ----------------------------------------------------------------------------
def _streams(symbols: np.ndarray, zero_symbol: int, gap_bits: int) -> tuple[list[int], list[int]]:
    """Sparse layout: (gaps, symbols) of the nonzero entries with filler zero entries."""
    max_gap = (1 << gap_bits) - 1
    positions = np.flatnonzero(symbols != zero_symbol)
    gaps, syms = [], []
    prev = -1
    for p in positions.tolist():
        gap = p - prev - 1
        while gap > max_gap:
            gaps.append(max_gap)
            syms.append(zero_symbol)  # filler: an explicit zero after max_gap zeros
            gap -= max_gap + 1
        gaps.append(gap)
        syms.append(int(symbols[p]))
        prev = p
    return gaps, syms


def _huffman_cost(stream: Sequence[int], alphabet: int) -> tuple[dict[int, int], int, int]:
    """(code lengths, stream bits, table bytes) of Huffman-coding ``stream``."""
    lengths = huffman.code_lengths(Counter(stream))
    return lengths, huffman.encoded_bits(stream, lengths), alphabet  # table: one length byte per symbol


def encode_layer(weight: torch.Tensor, codebook: torch.Tensor, assign: torch.Tensor, bits: int, gap_bits: int,
                 layout: str = "auto") -> tuple[dict, bytes, dict]:
    """Encode one shared layer. Returns (metadata, bytes, bit accounting)."""
    k = int(codebook.numel())
    zero = k  # symbol of an exact zero
    symbols = np.where(assign.reshape(-1).cpu().numpy() >= 0, assign.reshape(-1).cpu().numpy(), zero)
    n = symbols.size
    nnz = int((symbols != zero).sum())
    candidates = {}
    if layout in ("auto", "sparse"):
        gaps, syms = _streams(symbols, zero, gap_bits)
        gl, gbits, gtab = _huffman_cost(gaps, 1 << gap_bits)
        sl, sbits, stab = _huffman_cost(syms, k + 1)
        candidates["sparse"] = (gbits + sbits + 8 * (gtab + stab), (gaps, gl, gbits), (syms, sl, sbits))
    if layout in ("auto", "dense"):
        syms = symbols.tolist()
        sl, sbits, stab = _huffman_cost(syms, k + 1)
        candidates["dense"] = (sbits + 8 * stab, None, (syms, sl, sbits))
    mode = min(candidates, key=lambda m: candidates[m][0])
    _, gap_part, sym_part = candidates[mode]
    out = bytearray()
    meta: dict[str, Any] = {"layout": mode, "n": n, "k": k, "bits": bits, "gap_bits": gap_bits}
    if gap_part is not None:
        gaps, gl, gbits = gap_part
        table = bytes(gl.get(s, 0) for s in range(1 << gap_bits))
        data, nb = huffman.encode(gaps, gl)
        meta.update(n_gaps=len(gaps), gap_table=len(table), gap_bytes=len(data), gap_nbits=nb)
        out += table + data
    syms, sl, sbits = sym_part
    table = bytes(sl.get(s, 0) for s in range(k + 1))
    data, nb = huffman.encode(syms, sl)
    meta.update(n_syms=len(syms), sym_table=len(table), sym_bytes=len(data), sym_nbits=nb)
    out += table + data
    entries = len(syms)
    # Deep Compression accounting (bits) for this layer
    if mode == "sparse":
        b1 = entries * (32 + gap_bits)      # pruned: fp32 value + fixed-width relative index per entry
        b2 = entries * (bits + gap_bits)    # + shared: fixed-width cluster index instead of the value
    else:
        b1 = 32 * n                         # dense layout: nothing gained from zeros
        b2 = n * max(bits, math.ceil(math.log2(k + 1)))  # one code per weight (zero symbol included)
    acct = {
        "n": n, "nnz": nnz, "entries": entries,
        "b0": 32 * n,                       # dense fp32
        "b1": b1,
        "b2": b2 + 32 * k,                  # + the fp32 codebook
        "b3": 8 * len(out) + 32 * k,        # + Huffman: the bytes actually stored (streams + code tables)
        "layout": mode,
    }
    return meta, bytes(out), acct


def decode_layer(meta: dict, data: bytes, codebook: torch.Tensor) -> torch.Tensor:
    """Flat fp32 weights of one layer from its encoded bytes."""
    k, n = int(meta["k"]), int(meta["n"])
    pos = 0

    def lengths_from(table: bytes) -> dict[int, int]:
        return {s: int(length) for s, length in enumerate(table) if length}

    gaps = None
    if meta["layout"] == "sparse":
        gtab = data[pos: pos + meta["gap_table"]]
        pos += meta["gap_table"]
        gaps = huffman.decode(data[pos: pos + meta["gap_bytes"]], meta["gap_nbits"], meta["n_gaps"],
                              lengths_from(gtab))
        pos += meta["gap_bytes"]
    stab = data[pos: pos + meta["sym_table"]]
    pos += meta["sym_table"]
    syms = huffman.decode(data[pos: pos + meta["sym_bytes"]], meta["sym_nbits"], meta["n_syms"], lengths_from(stab))
    values = torch.cat([codebook.float(), torch.zeros(1)])  # symbol k = zero
    out = torch.zeros(n)
    if gaps is None:
        out = values[torch.tensor(syms, dtype=torch.int64)]
    else:
        gap_t = torch.tensor(gaps, dtype=torch.int64)
        positions = torch.cumsum(gap_t + 1, 0) - 1
        out[positions] = values[torch.tensor(syms, dtype=torch.int64)]
    return out


#: order of the integers describing one layer in the artifact (``layers`` is a list of such rows)
_FIELDS = ("layout", "n", "k", "bits", "gap_bits", "n_gaps", "gap_table", "gap_bytes", "gap_nbits", "n_syms",
           "sym_table", "sym_bytes", "sym_nbits", "offset", "nbytes", "codebook_offset")
_LAYOUTS = ("sparse", "dense")


def _from_raw(blob: bytes, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The tensor of ``dtype`` and ``shape`` whose bytes start at ``offset`` of ``blob``."""
    n = math.prod(shape) if len(shape) else 1
    size = n * torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer(bytearray(blob[offset: offset + size]), dtype=dtype)[:n].reshape(list(shape)).clone()


def encode_shared(student: nn.Module, method: "WeightSharing", context: dict[str, Any]) -> tuple[dict, dict]:
    """The Huffman-coded payload of a weight-shared student, and its Deep Compression breakdown.

    Everything — the per-layer Huffman streams and code tables, the fp32 codebooks and the raw
    bytes of the tensors that are not shared (biases, BN) — is one ``uint8`` tensor; the layer
    descriptions are rows of integers (see ``_FIELDS``), so the container adds little to the bytes.
    """
    layers = method.layers(student)
    streams = bytearray()
    books = bytearray()
    rows, names, shapes = [], [], []
    totals = Counter()
    per_layer = {}
    shared_keys = method.shared_keys(student)
    for name, module in layers.items():
        w = module.weight.detach().cpu().float()
        c = method.clusters[name]
        assign = torch.where(w != 0, c.assign.cpu(), torch.full_like(c.assign.cpu(), -1))
        # the codebook is read off the weights themselves (exactly what the model computes with)
        k = c.k
        codebook = torch.zeros(k)
        if k:
            codebook.index_put_((assign[assign >= 0],), w[assign >= 0])
        if not torch.equal(torch.where(assign >= 0, codebook[assign.clamp_min(0)], torch.zeros(())), w):
            raise RuntimeError(f"weight sharing: layer {name} is not shared (weights differ from their centroids)")
        bits, gap_bits = method.bits_for(module)
        meta, data, acct = encode_layer(w, codebook, assign, bits, gap_bits, method.layout)
        # exact round trip, checked now rather than discovered at load time
        if not torch.equal(decode_layer(meta, data, codebook).reshape(w.shape), w):
            raise RuntimeError(f"weight sharing: layer {name} does not decode to the same weights")
        meta.update(layout=_LAYOUTS.index(meta["layout"]), offset=len(streams), nbytes=len(data),
                    codebook_offset=len(books))
        rows.append([int(meta.get(f, 0)) for f in _FIELDS])
        names.append(name)
        shapes.append([int(v) for v in w.shape])
        streams += data
        books += raw_bytes(codebook)
        for key in ("n", "nnz", "b0", "b1", "b2", "b3"):
            totals[key] += acct[key]
        per_layer[name] = {"layout": acct["layout"], "k": k, "sparsity": 1 - acct["nnz"] / acct["n"],
                           "ratio": acct["b0"] / acct["b3"]}
    rest = bytearray()
    dense_index = []
    for key, t in student.state_dict().items():
        if key in shared_keys:
            continue
        if t.is_floating_point():
            stored = t.to(method.unshared_dtype)
            if not torch.equal(stored.to(t.dtype), t):
                raise RuntimeError(f"weight sharing: {key} is not rounded to {method.unshared_dtype} (finalize first)")
            t = stored
        dense_index.append([key, dtype_name(t.dtype), [int(v) for v in t.shape], len(rest)])
        rest += raw_bytes(t)
    blob = bytes(streams) + bytes(books) + bytes(rest)
    payload = {
        **context_fields(FORMAT, context),
        "structure": structure_of(student, context),
        "blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone() if blob else torch.empty(0, dtype=torch.uint8),
        "sections": [len(streams), len(books), len(rest)],
        "names": names,
        "shapes": shapes,
        "layers": rows,
        "dense_index": dense_index,
    }
    b0, b1, b2, b3 = (totals[k] for k in ("b0", "b1", "b2", "b3"))
    stats = {
        "backend": "huffman_decoded_fp32",
        "compute": "simulated",
        "fallback_reason": None,
        "dc_layers": len(rows),
        "dc_params": int(totals["n"]),
        "dc_params_nonzero": int(totals["nnz"]),
        "dc_params_ratio": totals["n"] / max(1, totals["nnz"]),
        "dc_pruning_ratio": b0 / b1,
        "dc_sharing_ratio": b1 / b2,
        "dc_huffman_ratio": b2 / b3,
        "dc_total_ratio": b0 / b3,
        "dc_encoded_bytes": b3 / 8,
        "dc_unshared_bytes": len(rest),
        "dc_unshared_dtype": dtype_name(method.unshared_dtype),
        "size_ratio_quantized_layers": b0 / b3,
        "dc_per_layer": per_layer,
    }
    return payload, stats


def load_payload(payload: dict) -> nn.Module:
    """Decode a :data:`FORMAT` payload into a working fp32 model."""

    model = build_structure(payload["arch"], payload["input_shape"], payload["num_classes"],
                            payload.get("structure"))
    blob = payload["blob"].numpy().tobytes()
    n_streams, n_books, _ = payload["sections"]
    books_at, rest_at = n_streams, n_streams + n_books
    state = {}
    for key, dtype, shape, offset in payload["dense_index"]:
        state[key] = _from_raw(blob, rest_at + offset, dtype_from_name(dtype), shape)
    for name, shape, row in zip(payload["names"], payload["shapes"], payload["layers"]):
        meta = dict(zip(_FIELDS, row))
        meta["layout"] = _LAYOUTS[meta["layout"]]
        data = blob[meta["offset"]: meta["offset"] + meta["nbytes"]]
        codebook = _from_raw(blob, books_at + meta["codebook_offset"], torch.float32, [meta["k"]])
        state[f"{name}.weight"] = decode_layer(meta, data, codebook).reshape(shape)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"weight-shared artifact does not match its architecture: {exc}") from exc
    return model.eval()


def uses_relative_index(payload: Mapping[str, Any]) -> bool:
    """Whether any layer of a :data:`FORMAT` payload took the sparse (relative-index) layout."""
    at = _FIELDS.index("layout")
    return any(int(row[at]) == _LAYOUTS.index("sparse") for row in payload.get("layers", []))


CODEC = Codec(FORMAT, kind="weight_shared", lossless=True,
              onnx_weights="dequantized fp32 (codebooks/Huffman have no ONNX Runtime form)",
              holds_sparse=uses_relative_index)
