"""Weight sharing + Huffman coding: stages 2 and 3 of Deep Compression (Han, Mao & Dally,
"Deep Compression: Compressing Deep Neural Networks with Pruning, Trained Quantization and
Huffman Coding", ICLR 2016).

1. **Sharing** — each conv/linear layer's nonzero weights are clustered with 1-D k-means
   into ``2^bits`` centroids (linear initialisation over [min, max], the paper's best
   choice; ``bits_conv`` / ``bits_fc`` default to the paper's 8 / 5). Exact zeros — the
   weights a pruning method removed — are not clustered and stay zero.
2. **Centroid fine-tuning** — from ``start_epoch`` on, every member of a cluster receives
   the cluster's summed gradient (the paper's Eq. 3, dL/dC_k = sum of dL/dW over the
   cluster) and, after each optimizer step, the members are set back to their common
   value (the cluster mean), so the weights stay shared whatever the optimizer.
3. **Encoding** — per layer, the cheaper of two layouts:
   ``sparse``: relative index (the gap of zeros before each stored weight, capped at
   ``2^gap_bits - 1`` with filler zero entries, as in the paper's Fig. 2) + centroid index;
   ``dense``: a centroid index (or the zero symbol) for every weight. The gap and index
   streams are Huffman coded (canonical codes, :mod:`compresslab.compress.huffman`).
   Codebooks are fp32. The tensors that are not shared (biases, BN parameters and statistics)
   are stored in ``unshared_dtype`` (fp16 by default; the model is rounded to it in
   ``finalize``, so the accuracy measured on the artifact includes that rounding).
   Everything is concatenated into one byte blob, so ``size_bytes`` is the encoded size;
   decoding gives back exactly the model that was evaluated.

The loaded artifact computes with the decoded fp32 weights (``compute: simulated``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress import huffman
from compresslab.compress.base import CompressionMethod
from compresslab.compress.bitpack import dtype_from_name, dtype_name
from compresslab.compress.quantization.layers import (
    build_structure,
    hide_epoch_from_selection,
    leaf_weight,
    quantizable_layers,
    structure_of,
)
from compresslab.errors import CheckpointError, ConfigError

SHARED_FORMAT = "compresslab.shared/1"
UNSHARED_DTYPES = ("float32", "float16", "bfloat16")


# ---- k-means -----------------------------------------------------------------------------
@torch.no_grad()
def kmeans_1d(values: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars with linear initialisation over [min, max].

    Returns (centroids sorted ascending, float32 (k',), assignment int64 of values' shape),
    with k' <= k (a cluster that ends up empty is dropped).
    """
    v = values.detach().reshape(-1).float()
    if v.numel() == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    lo, hi = float(v.min()), float(v.max())
    k = max(1, min(int(k), v.numel()))
    cent = torch.linspace(lo, hi, k) if k > 1 else v.mean().reshape(1)
    for _ in range(int(iters)):
        assign = _nearest(v, cent)
        sums = torch.zeros(k).index_add_(0, assign, v)
        counts = torch.zeros(k).index_add_(0, assign, torch.ones_like(v))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), cent)
        new, _ = torch.sort(new)
        if torch.equal(new, cent):
            break
        cent = new
    assign = _nearest(v, cent)
    used = torch.unique(assign)
    cent = cent[used]
    assign = _nearest(v, cent)
    return cent, assign.reshape(values.shape)


def _nearest(v: torch.Tensor, sorted_cent: torch.Tensor) -> torch.Tensor:
    if sorted_cent.numel() == 1:
        return torch.zeros_like(v, dtype=torch.int64)
    mids = (sorted_cent[1:] + sorted_cent[:-1]) / 2
    return torch.bucketize(v, mids)


# ---- the method --------------------------------------------------------------------------
class _Cluster:
    """Fixed assignment of one layer's nonzero weights to shared values."""

    def __init__(self, assign: torch.Tensor, k: int) -> None:
        self.assign = assign  # int64, weight's shape; -1 = pruned (zero)
        self.k = k


class WeightSharing(CompressionMethod):
    """Deep Compression weight sharing (k-means, centroid fine-tuning) + Huffman-coded artifact."""

    def __init__(self, name: str, bits_conv: int = 8, bits_fc: int = 5, gap_bits_conv: int = 8,
                 gap_bits_fc: int = 5, start_epoch: int = -2, kmeans_iters: int = 30,
                 exclude: Sequence[str] = (), layout: str = "auto", unshared_dtype: str = "float16") -> None:
        super().__init__(name)
        for key, val in (("bits_conv", bits_conv), ("bits_fc", bits_fc), ("gap_bits_conv", gap_bits_conv),
                         ("gap_bits_fc", gap_bits_fc)):
            if not 1 <= int(val) <= 16:
                raise ConfigError(f"quant.{key} must be in 1..16, got {val}")
        if layout not in ("auto", "sparse", "dense"):
            raise ConfigError(f"quant.layout must be auto, sparse or dense, got {layout!r}")
        if unshared_dtype not in UNSHARED_DTYPES:
            raise ConfigError(f"quant.unshared_dtype must be one of {list(UNSHARED_DTYPES)}, got {unshared_dtype!r}")
        self.bits_conv, self.bits_fc = int(bits_conv), int(bits_fc)
        self.gap_bits_conv, self.gap_bits_fc = int(gap_bits_conv), int(gap_bits_fc)
        self.start_epoch = int(start_epoch)
        self.kmeans_iters = int(kmeans_iters)
        self.exclude = list(exclude)
        self.layout = layout
        self.unshared_dtype = dtype_from_name(unshared_dtype)
        self.clusters: dict[str, _Cluster] = {}
        self.shared_during_training = False
        self._report: dict[str, Any] = {}

    def bits_for(self, module: nn.Module) -> tuple[int, int]:
        """(index bits, gap bits) of a layer: conv or fully connected settings."""
        if isinstance(module, nn.Linear):
            return self.bits_fc, self.gap_bits_fc
        return self.bits_conv, self.gap_bits_conv

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers whose weights are shared."""
        layers = quantizable_layers(model, self.exclude)
        if not layers:
            raise ConfigError(f"quant={self.name}: the student has no conv/linear layer to share")
        return layers

    def resolve_start(self, max_epochs: int) -> int:
        """``start_epoch`` counted from the end when negative."""
        return self.start_epoch if self.start_epoch >= 0 else max(0, int(max_epochs) + self.start_epoch)

    @torch.no_grad()
    def cluster(self, model: nn.Module) -> None:
        """k-means every layer's nonzero weights and snap them to their centroids."""
        self.clusters = {}
        for name, module in self.layers(model).items():
            w = module.weight.detach()
            bits, _ = self.bits_for(module)
            nz = w != 0
            assign = torch.full(w.shape, -1, dtype=torch.int64, device=w.device)
            if bool(nz.any()):
                cent, a = kmeans_1d(w[nz].cpu(), 1 << bits, self.kmeans_iters)
                assign[nz] = a.to(w.device)
                self.clusters[name] = _Cluster(assign, int(cent.numel()))
            else:
                self.clusters[name] = _Cluster(assign, 0)
        self.project(model)

    @torch.no_grad()
    def adopt(self, model: nn.Module) -> bool:
        """Take the assignment from weights that are already shared (<= 2^bits distinct nonzero
        values per layer, e.g. after a resume); False when some layer is not shared."""
        clusters = {}
        for name, module in self.layers(model).items():
            w = module.weight.detach()
            bits, _ = self.bits_for(module)
            nz = w != 0
            values, inverse = torch.unique(w[nz], return_inverse=True)
            if values.numel() > (1 << bits):
                return False
            assign = torch.full(w.shape, -1, dtype=torch.int64, device=w.device)
            assign[nz] = inverse
            clusters[name] = _Cluster(assign, int(values.numel()))
        self.clusters = clusters
        return True

    @torch.no_grad()
    def share_gradients(self, model: nn.Module) -> None:
        """Give every cluster member the cluster's summed gradient (Han et al. Eq. 3)."""
        for name, module in self.layers(model).items():
            c = self.clusters.get(name)
            leaf = leaf_weight(module)
            if c is None or leaf.grad is None or c.k == 0:
                continue
            g = leaf.grad
            members = c.assign >= 0
            idx = c.assign[members]
            sums = torch.zeros(c.k, dtype=g.dtype, device=g.device).index_add_(0, idx, g[members])
            g[members] = sums[idx]
            g[~members] = 0.0

    @torch.no_grad()
    def project(self, model: nn.Module) -> None:
        """Set each cluster's members to the cluster mean; zeros (pruned) stay zero."""
        for name, module in self.layers(model).items():
            c = self.clusters.get(name)
            if c is None:
                continue
            leaf = leaf_weight(module)
            w = module.weight.detach()
            members = (c.assign >= 0) & (w != 0)
            if c.k == 0 or not bool(members.any()):
                leaf.masked_fill_(~members, 0.0)
                continue
            idx = c.assign[members]
            vals = w[members].to(leaf.dtype)
            sums = torch.zeros(c.k, dtype=leaf.dtype, device=leaf.device).index_add_(0, idx, vals)
            counts = torch.zeros(c.k, dtype=leaf.dtype, device=leaf.device).index_add_(0, idx, torch.ones_like(vals))
            cent = sums / counts.clamp_min(1)
            leaf[members] = cent[idx]
            leaf.masked_fill_(~members, 0.0)

    def callbacks(self) -> list[Callback]:
        return [WeightSharingCallback(self)]

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        if not self.adopt(student):
            self.cluster(student)  # no fine-tuning happened (or the selection predates it)
        self.round_unshared(student)
        return student

    def shared_keys(self, model: nn.Module) -> set[str]:
        """State-dict keys of the shared (k-means coded) weights."""
        return {f"{name}.weight" for name in self.layers(model)}

    @torch.no_grad()
    def round_unshared(self, model: nn.Module) -> None:
        """Round the floating tensors that are not shared to ``unshared_dtype`` (in place), so the
        model computes with exactly the values the artifact stores."""
        shared = self.shared_keys(model)
        for key, t in model.state_dict().items():
            if key not in shared and t.is_floating_point():
                t.copy_(t.to(self.unshared_dtype))

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict:
        payload, stats = encode_shared(student, self, context)
        stats["shared_during_training"] = self.shared_during_training
        self._report = stats
        return payload

    def report(self) -> dict[str, Any]:
        return dict(self._report)


class WeightSharingCallback(Callback):
    """Clusters at ``start_epoch``, then shares gradients and re-projects after every step."""

    def __init__(self, method: WeightSharing) -> None:
        self.method = method

    def _started(self, trainer) -> bool:
        return trainer.current_epoch >= self.method.resolve_start(trainer.max_epochs)

    def on_train_start(self, trainer, pl_module) -> None:
        # resumed after sharing began: recover the assignment from the (shared) weights
        if self._started(trainer) and not self.method.clusters and not self.method.adopt(pl_module.model):
            self.method.cluster(pl_module.model)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._started(trainer) and not self.method.clusters:
            self.method.cluster(pl_module.model)
            self.method.shared_during_training = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.method.clusters:
            self.method.share_gradients(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.method.clusters:
            self.method.project(pl_module.model)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._started(trainer):
            hide_epoch_from_selection(trainer)


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


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_raw(blob: bytes, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    n = math.prod(shape) if len(shape) else 1
    size = n * torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer(bytearray(blob[offset: offset + size]), dtype=dtype)[:n].reshape(list(shape)).clone()


def encode_shared(student: nn.Module, method: WeightSharing, context: dict[str, Any]) -> tuple[dict, dict]:
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
        books += _raw_bytes(codebook)
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
        rest += _raw_bytes(t)
    blob = bytes(streams) + bytes(books) + bytes(rest)
    payload = {
        "format": SHARED_FORMAT,
        "arch": dict(context["arch"]),
        "input_shape": [int(v) for v in context["input_shape"]],
        "num_classes": int(context["num_classes"]),
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
        "quant_method": "weight_sharing",
        "quant_backend": "huffman_decoded_fp32",
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


def load_shared_payload(payload: dict) -> nn.Module:
    """Decode a :data:`SHARED_FORMAT` payload into a working fp32 model."""

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
