"""Canonical Huffman coding of integer symbol streams (Huffman 1952), as used by Deep
Compression (Han et al., "Deep Compression", ICLR 2016, Sec. 4) for the cluster indices
and the sparse index gaps.

A code is described by its code lengths only (canonical Huffman: codes are assigned in
order of (length, symbol)), so a stored table is just ``symbols`` and ``lengths``.
Code lengths are limited to :data:`MAX_CODE_LENGTH` bits (frequencies are flattened
and the code rebuilt in the rare case a tree gets deeper), which keeps decoding a
table lookup. The bitstream is MSB-first within each byte.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

MAX_CODE_LENGTH = 20


def code_lengths(freqs: dict[int, int], max_length: int = MAX_CODE_LENGTH) -> dict[int, int]:
    """Huffman code length of each symbol with a nonzero frequency.

    A single-symbol alphabet gets a 1-bit code. When the optimal tree is deeper than
    ``max_length``, frequencies are halved (rounding up) until it is not.
    """
    items = {int(s): int(f) for s, f in freqs.items() if f > 0}
    if not items:
        return {}
    if len(items) == 1:
        return {next(iter(items)): 1}
    while True:
        lengths = _huffman_lengths(items)
        if max(lengths.values()) <= max_length:
            return lengths
        items = {s: (f + 1) // 2 for s, f in items.items()}


def _huffman_lengths(freqs: dict[int, int]) -> dict[int, int]:
    # heap of (weight, tiebreak, symbols-in-subtree); each merge deepens its symbols by one
    heap = [(f, i, [s]) for i, (s, f) in enumerate(sorted(freqs.items()))]
    heapq.heapify(heap)
    depth = dict.fromkeys(freqs, 0)
    counter = len(heap)
    while len(heap) > 1:
        f1, _, s1 = heapq.heappop(heap)
        f2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            depth[s] += 1
        heapq.heappush(heap, (f1 + f2, counter, s1 + s2))
        counter += 1
    return depth


def canonical_codes(lengths: dict[int, int]) -> dict[int, tuple[int, int]]:
    """symbol -> (code value, length) for the canonical code with these lengths."""
    code = 0
    prev_len = 0
    out = {}
    for sym, length in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= (length - prev_len)
        out[sym] = (code, length)
        code += 1
        prev_len = length
    return out


def encoded_bits(symbols: Sequence[int], lengths: dict[int, int]) -> int:
    """Length in bits of ``symbols`` coded with ``lengths``."""
    counts = Counter(int(s) for s in symbols)
    return sum(c * lengths[s] for s, c in counts.items())


def encode(symbols: Iterable[int], lengths: dict[int, int]) -> tuple[bytes, int]:
    """Encode ``symbols``; returns (bytes, number of valid bits)."""
    codes = canonical_codes(lengths)
    syms = np.asarray(list(symbols), dtype=np.int64)
    if syms.size == 0:
        return b"", 0
    alphabet = np.array(sorted(codes), dtype=np.int64)
    code_val = np.array([codes[s][0] for s in alphabet], dtype=np.int64)
    code_len = np.array([codes[s][1] for s in alphabet], dtype=np.int64)
    pos = np.searchsorted(alphabet, syms)
    if np.any(pos >= alphabet.size) or np.any(alphabet[np.minimum(pos, alphabet.size - 1)] != syms):
        raise ValueError("symbol without a code")
    vals, lens = code_val[pos], code_len[pos]
    total = int(lens.sum())
    # expand each code into its bits, MSB first
    max_len = int(lens.max())
    shifts = np.arange(max_len - 1, -1, -1, dtype=np.int64)  # bit positions of a max_len-wide code
    bits = (vals[:, None] >> shifts[None, :]) & 1            # right-aligned codes
    keep = shifts[None, :] < lens[:, None]                    # only the low `len` bits are the code
    stream = bits[keep].astype(np.uint8)
    return np.packbits(stream).tobytes(), total


def decode(data: bytes, nbits: int, count: int, lengths: dict[int, int]) -> list[int]:
    """Decode ``count`` symbols from the first ``nbits`` bits of ``data``."""
    if count == 0:
        return []
    codes = canonical_codes(lengths)
    max_len = max(length for _, length in codes.values())
    table_sym = np.zeros(1 << max_len, dtype=np.int64)
    table_len = np.zeros(1 << max_len, dtype=np.int64)
    for sym, (val, length) in codes.items():
        lo = val << (max_len - length)
        hi = (val + 1) << (max_len - length)
        table_sym[lo:hi] = sym
        table_len[lo:hi] = length
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:nbits].astype(np.int64)
    stream = np.concatenate([stream, np.zeros(max_len, dtype=np.int64)])
    # window[i] = the max_len bits starting at bit i, as an integer
    window = np.zeros(nbits + 1, dtype=np.int64)
    for k in range(max_len):
        window = (window << 1) | stream[k: k + nbits + 1]
    out = [0] * count
    pos = 0
    tsym, tlen, win = table_sym.tolist(), table_len.tolist(), window.tolist()
    for i in range(count):
        w = win[pos]
        out[i] = tsym[w]
        pos += tlen[w]
        if pos > nbits:
            raise ValueError("Huffman stream ended early")
    return out
