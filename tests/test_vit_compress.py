"""Head pruning, N:M sparsity and weight-only int8/int4 (issue 26): each algorithm against an
independent computation, the codecs round-trip and refuse bad data, and end-to-end runs whose
saved artifacts hold the promised structure."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compresslab.artifact import load_model_file, read_payload
from compresslab.compress.codecs.nm import decode_nm, encode_nm
from compresslab.compress.codecs.weight_only import decode_weight, encode_weight
from compresslab.compress.prune.heads import HeadMask, gradient_importance, heads_to_remove, remove_heads
from compresslab.compress.prune.nm import n_schedule, nm_mask
from compresslab.compress.quant.weight_only import torchao_config
from compresslab.errors import CheckpointError
from compresslab.models.attention import ExplicitAttention
from compresslab.pipeline import run_experiment


# ---- N:M -------------------------------------------------------------------------------------
def _nm_reference(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask by plain Python: in each group of m along the flattened input, the n largest |w|."""
    rows = w.reshape(w.shape[0], -1).tolist()
    keep = []
    for row in rows:
        out = []
        for g in range(0, len(row), m):
            group = row[g:g + m]
            top = sorted(range(m), key=lambda i: (-abs(group[i]), i))[:n]
            out += [i in top for i in range(m)]
        keep.append(out)
    return torch.tensor(keep).reshape(w.shape)


def test_nm_mask_matches_a_plain_computation_and_never_revives():
    torch.manual_seed(0)
    for shape in [(6, 16), (4, 2, 2, 2)]:  # a Linear and a conv (reduction dim = in·kh·kw)
        w = torch.randn(shape)
        assert torch.equal(nm_mask(w, 2, 4), _nm_reference(w, 2, 4))
    w = torch.randn(5, 8)
    first = nm_mask(w, 3, 4)
    w2 = w.clone()
    w2[~first] = 100.0  # pruned weights that grew back must stay pruned
    second = nm_mask(w2, 2, 4, prior=first)
    assert not bool((second & ~first).any())
    assert torch.equal(second.reshape(5, 2, 4).sum(-1), torch.full((5, 2), 2))
    assert n_schedule(2, 4, 2) == [3, 2] and n_schedule(2, 4, 1) == [2]


def test_nm_codec_round_trips_packs_2_bits_and_refuses_bad_positions():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    w = w * nm_mask(w, 2, 4)
    rec = encode_nm(w, 2, 4)
    assert rec["values"].numel() == w.numel() // 2 and rec["positions"].numel() == w.numel() // 2 * 2 // 8
    assert torch.equal(decode_nm(rec, 2, 4), w)
    with pytest.raises(ValueError, match="2:4"):
        encode_nm(torch.randn(8, 32), 2, 4)
    bad = dict(rec, positions=torch.zeros_like(rec["positions"]))  # every position 0: not distinct
    with pytest.raises(CheckpointError, match="distinct"):
        decode_nm(bad, 2, 4)


# ---- heads -----------------------------------------------------------------------------------
def _attention(seed=0, heads=4, width=16):
    torch.manual_seed(seed)
    return ExplicitAttention(width, heads, batch_first=True).eval()


class _Wrap(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn, self.head = attn, nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_removing_heads_equals_zeroing_their_outputs():
    attn = _attention()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), HeadMask({"a": attn}, {"a": torch.tensor([1.0, 0.0, 1.0, 0.0])}):
        masked = attn(x, x, x, need_weights=False)[0]
    remove_heads(attn, [1, 3])
    assert attn.num_heads == 2 and attn.q_proj.out_features == 8 and attn.out_proj.in_features == 8
    with torch.no_grad():
        torch.testing.assert_close(attn(x, x, x, need_weights=False)[0], masked)


def test_gradient_importance_is_the_finite_difference_of_the_loss_in_the_head_mask():
    model = _Wrap(_attention(1))
    x, y = torch.randn(4, 5, 16), torch.tensor([0, 1, 2, 0])
    scores = gradient_importance(model, {"attn": model.attn}, [(x, y)])["attn"]

    def loss(mask):
        with torch.no_grad(), HeadMask({"attn": model.attn}, {"attn": mask}):
            return F.cross_entropy(model(x), y).double()

    eps = 1e-3
    for h in range(4):
        up, down = torch.ones(4), torch.ones(4)
        up[h] += eps
        down[h] -= eps
        assert abs(float(scores[h]) - abs(float(loss(up) - loss(down)) / (2 * eps))) < 2e-3


def test_heads_to_remove_per_layer_and_global_keep_one_head():
    scores = {"a": torch.tensor([0.1, 0.9, 0.2, 0.8]), "b": torch.tensor([0.05, 0.04, 0.03, 0.02])}
    assert heads_to_remove(scores, 0.5, "layer") == {"a": [0, 2], "b": [2, 3]}
    glob = heads_to_remove(scores, 0.5, "global")  # 4 lowest overall are all in b: b keeps one head
    assert glob["b"] == [1, 2, 3] and glob["a"] == [0]


# ---- weight-only -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_codec_rebuilds_the_torchao_weight(bits):
    from torchao.quantization import quantize_

    torch.manual_seed(2)
    layer = nn.Linear(64, 24)
    w32 = layer.weight.detach().clone()
    quantize_(layer, torchao_config(bits, 32))
    rec = encode_weight(layer.weight, bits)
    again = decode_weight(rec)
    torch.testing.assert_close(again.dequantize(), layer.weight.dequantize(), rtol=0, atol=0)
    codes = rec["codes"].numel() * rec["codes"].element_size()
    assert codes == w32.numel() * bits // 8
    # int4: codes + fp32 scales per group of 32 <= 0.2 x the fp32 weight
    stored = codes + rec["scale"].numel() * 4 + (rec["zero_point"].numel() if "zero_point" in rec else 0)
    assert stored <= (0.2 if bits == 4 else 0.3) * w32.numel() * 4
    scale = 2 * w32.abs().reshape(24, 2, 32).amax(-1) / (2 ** bits - 1)  # symmetric over the full code range
    torch.testing.assert_close(rec["scale"], scale, rtol=1e-5, atol=1e-7)
    bad = dict(rec, scale=rec["scale"][:, :1])
    with pytest.raises(CheckpointError, match="scales"):
        decode_weight(bad)


# ---- end to end on vit_tiny ------------------------------------------------------------------
VIT = ["student=vit_tiny", "teacher=none", "student.epochs=2", "student.arch.depth=2"]


def test_heads_run_halves_every_block_and_the_artifact_rebuilds_it(make_cfg):
    cfg = make_cfg(VIT + ["prune=heads", "prune.ratio=0.5", "prune.start=1", "prune.taylor_batches=2"])
    record = run_experiment(cfg)
    assert record["status"] == "completed", record.get("error")
    student, ref = record["student"], record["reference"]
    assert set(map(tuple, student["prune"]["heads"].values())) == {(4, 2)}
    model = load_model_file(student["artifact"])
    attns = [m for m in model.modules() if isinstance(m, ExplicitAttention)]
    assert [a.num_heads for a in attns] == [2, 2] and all(a.q_proj.out_features == 32 for a in attns)
    assert student["params"] == sum(p.numel() for p in model.parameters()) < ref["params"]
    assert student["macs"] < ref["macs"]


def test_nm_run_saves_exactly_2_of_every_4_along_the_input(make_cfg):
    record = run_experiment(make_cfg(VIT + ["prune=nm", "prune.start=1"]))
    assert record["status"] == "completed", record.get("error")
    rep = record["student"]["prune"]
    assert rep["nm_kernel"] == "none" and rep["nm_pattern_ok"]
    payload = read_payload(record["student"]["artifact"])
    assert payload["format"] == "compresslab.nm/1" and set(payload["nm"]) == set(rep["nm_layers"])
    assert any(".q_proj" in n for n in payload["nm"]) and any(".mlp." in n for n in payload["nm"])
    model = load_model_file(record["student"]["artifact"])
    for name in payload["nm"]:
        w = model.get_submodule(name).weight.detach()
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert torch.equal(groups, torch.full_like(groups, 2)), name


def test_weight_only_int4_run_records_packed_size_accuracy_and_latency(make_cfg):
    record = run_experiment(make_cfg(VIT + ["quant=weight_only", "quant.bits=4"]))
    assert record["status"] == "completed", record.get("error")
    student, rep = record["student"], record["student"]["quant"]
    assert rep["linear_packed_vs_fp32"] <= 0.2 and student["size_bytes"] < record["reference"]["size_bytes"]
    assert student["acc_top1"] is not None and student["latency_ms_b1"] > 0 and student["latency_ms_bN"] > 0
    payload = read_payload(student["artifact"])
    assert payload["format"] == "compresslab.weight_only/1"
    assert {r["codes"].dtype for r in payload["quantized"].values()} == {torch.uint8}
    assert json.loads(json.dumps(rep))["layers"] == list(payload["quantized"])
