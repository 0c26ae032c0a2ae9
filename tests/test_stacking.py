"""Stacking in the codec contract (issue #23): a pruned student's zeros go through the one shared
sparse layer whichever codec claims the file, the file loads back to the same outputs, and
``stacked_encodings`` / ``encodings_record`` say what it stacks and what it cannot."""

from __future__ import annotations

import math

import pytest
import torch

from compresslab.artifact import atomic_torch_save, codec_of, load_model_file, read_payload
from compresslab.compress.codecs.lowbit import encode_lowbit
from compresslab.compress.codecs.lowrank import lowrank_payload
from compresslab.compress.codecs.sparse import merge_zeros, split_zeros
from compresslab.compress.codecs.stacking import encodings_record, stacked_encodings
from compresslab.compress.lowrank.svd import factorize
from compresslab.compress.common import set_module
from compresslab.models import build_model

SHAPE = (1, 8, 8)
ARCH = {"_target_": "compresslab.models.MLP", "hidden": [64, 32]}
CTX = {"arch": ARCH, "input_shape": list(SHAPE), "num_classes": 10}


def _mlp(sparsity: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ARCH, SHAPE, 10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and sparsity:
                w = m.weight
                w[w.abs() < w.abs().flatten().quantile(sparsity)] = 0.0
    return model


def _roundtrip(payload: dict, tmp_path) -> torch.nn.Module:
    atomic_torch_save(payload, tmp_path / "a.pt")
    return load_model_file(tmp_path / "a.pt")


def test_split_and_merge_zeros_invert_each_other_and_keep_only_the_other_codes():
    codes = torch.tensor([2, 2, 0, 3, 2, 1, 2, 2, 2, 3])
    bits, kept = split_zeros(codes, zero=2)
    assert kept.tolist() == [0, 3, 1, 3] and bits.numel() == 2  # ceil(10 / 8) bytes of bitmask
    assert torch.equal(merge_zeros(bits, kept, codes.numel(), zero=2), codes)
    with pytest.raises(ValueError, match="corrupt sparse codes"):
        merge_zeros(bits, kept[:3], codes.numel(), zero=2)


@pytest.mark.parametrize("bits", [4, "ternary"])
def test_lowbit_codes_stack_with_pruning_and_reload_exactly(bits, tmp_path):
    from compresslab.compress.quant.quantizers import parse_bits, quantize_weight

    scheme, nbits = parse_bits(bits)
    zero = {"uniform": 1 << (nbits - 1), "ternary": 1}[scheme]  # the code of a zero weight
    code_bytes, stacks = {}, {}
    for sparsity in (0.0, 0.9):
        model = _mlp(sparsity)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        payload, _ = encode_lowbit(model, names, scheme, nbits, True, torch.float16, None, CTX)
        loaded = _roundtrip(payload, tmp_path)
        ref = _roundtrip(encode_lowbit(model, names, scheme, nbits, True, torch.float16, None, CTX)[0], tmp_path)
        x = torch.randn(5, *SHAPE)
        assert torch.equal(loaded(x), ref(x))
        zeros = [m.weight for m in loaded.modules() if isinstance(m, torch.nn.Linear)]
        assert sparsity == 0.0 or all(float((w == 0).float().mean()) >= 0.89 for w in zeros)
        stacks[sparsity] = stacked_encodings(payload)
        code_bytes[sparsity] = payload["codes"].numel()
        # independent count: per layer a bitmask + the packed codes that are not the zero code
        expected = 0
        for name in names:
            codes = quantize_weight(model.get_submodule(name).weight, scheme, nbits, True, torch.float16)[0]
            numel, kept = codes.numel(), int((codes != zero).sum())
            packed = (lambda k: math.ceil(k / 5)) if scheme == "ternary" else (lambda k: math.ceil(k * nbits / 8))
            expected += min(math.ceil(numel / 8) + packed(kept), packed(numel))
        assert code_bytes[sparsity] == expected
    assert stacks == {0.0: ["lowbit"], 0.9: ["lowbit", "sparse"]}
    assert code_bytes[0.9] < 0.75 * code_bytes[0.0]  # a zero costs a bit, not a code (ternary: 1.6 bits)


def test_binary_codes_cannot_drop_zeros_and_the_record_says_so(tmp_path):
    from compresslab.compress.quant.lowbit import LowBit

    model = _mlp(0.9)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    payload, _ = encode_lowbit(model, names, "binary", 1, True, torch.float16, None, CTX)
    pruner = type("Pruner", (), {"axis": "prune", "name": "agp", "codec_kind": "sparse"})()
    quant = LowBit("binary", bits="binary")
    quant.axis = "quant"
    record = encodings_record(payload, [pruner, quant])
    assert record["stacks"] == ["lowbit"] and list(record["not_stacked"]) == ["prune"]
    assert "prune=agp's sparse encoding is not in the compresslab.lowbit/1 file" in record["not_stacked"]["prune"]


def test_lowrank_factors_go_through_the_sparse_layer(tmp_path):
    model = _mlp(0.0)
    set_module(model, "features.1", factorize(model.features[1], "linear", 8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight[m.weight.abs() < m.weight.abs().flatten().quantile(0.8)] = 0.0
    payload = lowrank_payload(model, CTX)
    assert stacked_encodings(payload) == ["lowrank", "sparse"]
    loaded = _roundtrip(payload, tmp_path)
    x = torch.randn(5, *SHAPE)
    assert torch.equal(loaded(x), model(x))
    assert codec_of(read_payload(tmp_path / "a.pt")["format"]).kind == "lowrank"


#: what ``prune=agp`` alone reports under student.prune (its finalize and side files, tests/test_prune.py)
AGP_KEYS = {"macs_before", "params_before", "final_sparsity_target", "sparsity_prunable", "prunable_params",
            "prunable_nonzero", "macs_after", "macs_nonzero", "macs_nonzero_ratio", "selected_weights",
            "schedule_done", "schedule_history", "layer_sparsity", "dense_size_bytes", "encoded_size_bytes",
            "encoded_raw_bytes", "encoded_vs_dense", "encoding_layouts", "compression", "layer_sparsity_table"}


def test_agp_with_ptq_int8_stacks_reloads_in_a_fresh_process_and_reports_what_agp_alone_does(make_cfg):
    from compresslab.pipeline import run_experiment

    record = run_experiment(make_cfg(["teacher=none", "student=lenet300", "prune=agp", "prune.unit=step",
                                      "prune.start=0", "prune.end=2", "prune.frequency=1", "prune.final_sparsity=0.9",
                                      "quant=ptq_int8", "quant.num_calibration_batches=2",
                                      "measure.fresh_process=true"]))
    s = record["student"]
    assert s["encodings"] == {"format": "compresslab.int8_pt2e/1", "stacks": ["int8", "sparse"], "not_stacked": {}}
    assert s["measured_in"] == "fresh_process" and s["fresh_process_max_abs_diff"] <= 1e-5
    assert set(s["prune"]) == AGP_KEYS  # agp's report although int8 claimed the file
    assert s["size_ratio"] > 1.3 / s["prune"]["encoded_vs_dense"]  # int8 nonzeros beat agp's own fp32 sparse file
    assert record["schema_version"] == 3 and not {"sparsity_prunable", "backend", "compute"} & set(s)
