"""Deep Compression weight sharing: Huffman code optimality and exact round trips, k-means,
shared gradients, the sparse (relative index) encoding of pruned layers, and the pipeline run."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter

import pytest
import torch

from compresslab.artifact import atomic_torch_save, load_model_file
from compresslab.compress.codecs import huffman
from compresslab.compress.codecs.weight_sharing import decode_layer, encode_layer
from compresslab.compress.quant.weight_sharing import WeightSharing, kmeans_1d
from compresslab.models import build_model
from compresslab.pipeline import run_experiment

SHAPE = (1, 8, 8)


def _optimal_huffman_bits(freqs: list[int]) -> int:
    """Cost of an optimal prefix code = sum of the weights of all internal nodes (independent)."""
    if len(freqs) == 1:
        return freqs[0]
    heap = list(freqs)
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


@pytest.mark.parametrize("seed", range(4))
def test_huffman_is_optimal_prefix_free_and_round_trips(seed):
    rng = random.Random(seed)
    symbols = [min(40, int(rng.expovariate(0.25))) for _ in range(rng.randint(1, 5000))]
    freqs = Counter(symbols)
    lengths = huffman.code_lengths(freqs)
    assert huffman.encoded_bits(symbols, lengths) == _optimal_huffman_bits(list(freqs.values()))
    assert sum(2.0 ** -l for l in lengths.values()) <= 1.0  # Kraft
    codes = huffman.canonical_codes(lengths)
    words = [format(v, f"0{l}b") for v, l in codes.values()]
    assert not any(a != b and b.startswith(a) for a in words for b in words)  # prefix-free
    data, nbits = huffman.encode(symbols, lengths)
    assert nbits == huffman.encoded_bits(symbols, lengths) and len(data) == math.ceil(nbits / 8)
    assert huffman.decode(data, nbits, len(symbols), lengths) == symbols


def test_huffman_single_symbol_and_length_limit():
    lengths = huffman.code_lengths({7: 10})
    assert lengths == {7: 1}
    assert huffman.decode(*huffman.encode([7] * 10, lengths), 10, lengths) == [7] * 10
    fib = {i: f for i, f in enumerate([1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584,
                                       4181, 6765, 10946, 17711, 28657, 46368])}
    limited = huffman.code_lengths(fib, max_length=12)
    assert max(limited.values()) <= 12 and sum(2.0 ** -l for l in limited.values()) <= 1.0


def test_kmeans_1d_is_a_lloyd_fixed_point():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(500, generator=g) * 0.1 - 1, torch.randn(500, generator=g) * 0.1 + 1])
    cent, assign = kmeans_1d(v, 8)
    assert cent.numel() <= 8 and torch.all(cent[1:] > cent[:-1])
    dist = (v[:, None] - cent[None, :]).abs()
    assert torch.equal(assign, dist.argmin(1))  # nearest centroid
    for k in range(cent.numel()):
        assert cent[k] == pytest.approx(float(v[assign == k].mean()), abs=1e-5)  # centroid = cluster mean


def _shared_layer(n_out=30, n_in=40, k=16, sparsity=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    w[torch.rand(w.shape, generator=g) < sparsity] = 0.0
    cent, a = kmeans_1d(w[w != 0], k)
    assign = torch.full(w.shape, -1, dtype=torch.int64)
    assign[w != 0] = a
    shared = torch.where(assign >= 0, cent[assign.clamp_min(0)], torch.zeros(()))
    return shared, cent, assign


@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_layer_encoding_decodes_exactly_and_sizes_match_an_independent_count(layout):
    w, cent, assign = _shared_layer()
    w[3, :] = 0.0  # a long run of zeros: gaps above 2^gap_bits - 1 need filler entries
    w[4, :] = 0.0
    assign[3:5] = -1
    meta, data, acct = encode_layer(w, cent, assign, bits=4, gap_bits=3, layout=layout)
    decoded = decode_layer(meta, data, cent).reshape(w.shape)
    assert torch.equal(decoded, w) and torch.all(decoded[w == 0] == 0)
    # independent streams and Huffman sizes
    flat = w.reshape(-1)
    nz = torch.nonzero(flat).reshape(-1).tolist()
    symbols = [int(assign.reshape(-1)[p]) for p in nz]
    if layout == "sparse":
        gaps, syms, prev = [], [], -1
        for p, s in zip(nz, symbols):
            gap = p - prev - 1
            while gap > 7:
                gaps.append(7)
                syms.append(cent.numel())
                gap -= 8
            gaps.append(gap)
            syms.append(s)
            prev = p
        streams = [(gaps, 8), (syms, cent.numel() + 1)]
    else:
        syms = [int(s) if s >= 0 else cent.numel() for s in assign.reshape(-1).tolist()]
        streams = [(syms, cent.numel() + 1)]
    total_bits = sum(_optimal_huffman_bits(list(Counter(s).values())) for s, _ in streams)
    table_bytes = sum(a for _, a in streams)
    assert len(data) == sum(math.ceil(_optimal_huffman_bits(list(Counter(s).values())) / 8) for s, _ in streams) \
        + table_bytes
    assert meta["layout"] == layout and acct["b3"] == 8 * len(data) + 32 * cent.numel()
    assert acct["nnz"] == len(nz) and total_bits <= 8 * len(data)


def test_shared_gradients_are_cluster_sums_and_projection_keeps_zeros():
    torch.manual_seed(0)
    model = build_model({"_target_": "compresslab.models.MLP", "hidden": [20]}, SHAPE, 10)
    layer = model.features[1]
    with torch.no_grad():
        layer.weight[:, :30] = 0.0
    method = WeightSharing("ws", bits_fc=3)
    method.cluster(model)
    c = method.clusters["features.1"]
    assert torch.all(c.assign[:, :30] == -1)
    assert len(torch.unique(layer.weight[layer.weight != 0])) <= 8
    model(torch.randn(16, *SHAPE)).square().sum().backward()
    raw = layer.weight.grad.clone()
    method.share_gradients(model)
    for k in range(c.k):
        members = c.assign == k
        assert torch.allclose(layer.weight.grad[members], raw[members].sum().expand(int(members.sum())), atol=1e-5)
    assert torch.all(layer.weight.grad[:, :30] == 0)
    with torch.no_grad():
        layer.weight.add_(0.01 * torch.randn_like(layer.weight))  # an optimizer step that breaks sharing
        layer.weight[0, 40] = 0.0  # ... and a weight a pruning callback just removed
    method.project(model)
    assert torch.all(layer.weight[:, :30] == 0) and layer.weight[0, 40] == 0
    assert method.adopt(model) and len(torch.unique(layer.weight[layer.weight != 0])) <= 8


def test_weight_shared_artifact_decodes_to_the_same_weights(tmp_path):
    torch.manual_seed(0)
    arch = {"_target_": "compresslab.models.MLP", "hidden": [300, 100]}
    model = build_model(arch, SHAPE, 10).eval()
    with torch.no_grad():
        for m in (model.features[1], model.features[3]):
            m.weight[m.weight.abs() < m.weight.abs().quantile(0.9)] = 0.0  # 90% pruned
    method = WeightSharing("ws")
    method.bind({"arch": arch, "input_shape": list(SHAPE), "num_classes": 10})  # report computed at finalize
    model = method.finalize(model, None)
    payload = method.export(model, {"arch": arch, "input_shape": list(SHAPE), "num_classes": 10})
    r = method.report()
    assert r["dc_total_ratio"] == pytest.approx(r["dc_pruning_ratio"] * r["dc_sharing_ratio"] * r["dc_huffman_ratio"])
    assert r["dc_params_nonzero"] == sum(int((m.weight != 0).sum()) for m in model.modules()
                                          if isinstance(m, torch.nn.Linear))
    assert r["dc_per_layer"]["features.1"]["layout"] == "sparse" and r["dc_total_ratio"] > 20
    from compresslab.compress.codecs.stacking import stacked_encodings

    assert stacked_encodings(payload) == ["weight_shared", "sparse"]  # recorded as stacked (student.encodings)
    atomic_torch_save(payload, tmp_path / "ws.pt")
    loaded = load_model_file(tmp_path / "ws.pt")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_unshared_tensors_are_stored_in_fp16_and_the_file_is_the_blob_plus_a_small_container(tmp_path):
    torch.manual_seed(0)
    arch = {"_target_": "compresslab.models.MLP", "hidden": [300, 100]}
    base = build_model(arch, SHAPE, 10).eval()
    n_bias = sum(m.bias.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    sizes = {}
    for dtype in ("float32", "float16"):
        model = build_model(arch, SHAPE, 10).eval()
        model.load_state_dict(base.state_dict())
        method = WeightSharing("ws", unshared_dtype=dtype)
        model = method.finalize(model, None)
        payload = method.export(model, {"arch": arch, "input_shape": list(SHAPE), "num_classes": 10})
        assert {dt for _, dt, _, _ in payload["dense_index"]} == {dtype}
        path = tmp_path / f"{dtype}.pt"
        atomic_torch_save(payload, path)
        sizes[dtype] = (path.stat().st_size, payload["blob"].numel())
        loaded = load_model_file(path)
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name  # the model was rounded to what the file stores
        x = torch.randn(4, *SHAPE)
        assert torch.equal(model(x), loaded(x))
    # fp16 biases: exactly 2 bytes fewer per bias in the blob; the biases really were rounded
    assert sizes["float32"][1] - sizes["float16"][1] == 2 * n_bias
    assert not torch.equal(model.features[1].bias, base.features[1].bias)
    assert torch.allclose(model.features[1].bias, base.features[1].bias, atol=1e-3)
    for file_size, blob in sizes.values():
        assert blob < file_size < blob + 2500  # torch.save's zip + the plain-data description


def test_prune_agp_then_weight_sharing_pipeline(make_cfg):
    record = run_experiment(make_cfg([
        "student=lenet300", "teacher=none", "prune=agp", "quant=weight_sharing", "student.epochs=3",
        "prune.start=0", "prune.end=1", "quant.start_epoch=-1"]))
    s = record["student"]["quant"]
    assert record["axes"]["quant"] == "weight_sharing" and s["compute"] == "simulated"
    assert s["shared_during_training"] is True
    assert s["dc_params_ratio"] > 5  # the pruned zeros were kept zero through sharing and encoding
    assert s["dc_total_ratio"] == pytest.approx(s["dc_pruning_ratio"] * s["dc_sharing_ratio"] * s["dc_huffman_ratio"])
    model = load_model_file(record["student"]["artifact"])
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            assert len(torch.unique(m.weight[m.weight != 0])) <= 32
