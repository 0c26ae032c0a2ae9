"""quant=rtn|gptq|awq|smoothquant (issue #27): each algorithm against an independent computation,
the packed_int codec round trip, and the methods on a tiny Llama and an MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresslab.compress.calibration import capture_stats
from compresslab.compress.codecs.packed_int import decode_layer, encode_layer, layer_bytes
from compresslab.compress.quant import grid
from compresslab.compress.quant.llm import AWQQuant, GPTQQuant, RTNQuant, SmoothQuant, awq_scale, smoothquant_scale
from compresslab.compress.quant.smoothing import fold_smoothing
from compresslab.errors import ConfigError
from test_calibration import llama_linears, tiny_llama


def correlated(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) + 2 * torch.eye(n, dtype=torch.float64)
    return torch.randn(rows, n, generator=g, dtype=torch.float64) @ mix


def reference_gptq(w: torch.Tensor, x: torch.Tensor, bits: int, g: int, symmetric: bool) -> torch.Tensor:
    """GPTQ by its definition: quantize column i, then re-fit every later column by least squares
    (lstsq on the inputs X, no Hessian inverse) so X·Wᵀ stays as close as possible."""
    w0, cur = w.double(), w.double().clone()
    out, n = w.shape
    fixed = torch.zeros_like(cur)
    target = x @ w0.T
    for i in range(n):
        if i % g == 0:
            s, z = grid.group_params(cur[:, i:i + g], bits, symmetric)
            s = s.double()
        c = grid.quantize_codes(cur[:, i], s, z, bits)
        fixed[:, i] = (c - z).double() * s
        if i + 1 < n:
            rest = target - x[:, :i + 1] @ fixed[:, :i + 1].T
            cur[:, i + 1:] = torch.linalg.lstsq(x[:, i + 1:], rest).solution.T
    return fixed


@pytest.mark.parametrize("group,symmetric", [(4, True), (8, False)])
def test_gptq_matches_column_by_column_least_squares(group, symmetric):
    x = correlated(64, 8)
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 2 * x.T @ x / x.shape[0]
    q = grid.gptq(w, h, bits=3, group_size=group, symmetric=symmetric, damp=0.0, block_size=4)
    torch.testing.assert_close(q.dequantize().double(), reference_gptq(w, x, 3, group, symmetric), atol=1e-5, rtol=0)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_rtn_on_correlated_inputs(act_order):
    x = correlated(256, 32, seed=2)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    xtx = x.T @ x
    for bits in (3, 4):
        q = grid.gptq(w, 2 * xtx / 256, bits, 8, True, damp=0.01, act_order=act_order, block_size=16)
        r = grid.rtn(w, bits, 8, True)
        e_gptq, e_rtn = grid.output_error(q.dequantize() - w, xtx), grid.output_error(r.dequantize() - w, xtx)
        assert e_gptq < 0.7 * e_rtn
        # output_error is the summed squared output difference over the rows
        assert e_rtn == pytest.approx(float(((x @ (r.dequantize() - w).double().T) ** 2).sum()), rel=1e-6)


def test_gptq_keeps_pruned_zeros_and_codes_stay_on_the_grid():
    x = correlated(128, 16, seed=4)
    w = torch.randn(4, 16)
    w[:, ::2] = 0.0
    q = grid.gptq(w, 2 * x.T @ x / 128, 4, 8, False)
    assert (q.dequantize()[:, ::2] == 0).all()
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 15


def test_rtn_grid_formulas():
    w = torch.tensor([[-1.0, 0.0, 0.5, 0.25]])
    sym = grid.rtn(w, 4, 4, True)
    assert float(sym.scale) == pytest.approx(2 * 1.0 / 15, rel=1e-3) and int(sym.zero) == 8
    asym = grid.rtn(w, 4, 4, False)
    assert float(asym.scale) == pytest.approx(1.5 / 15, rel=1e-3) and int(asym.zero) == 10
    assert float(asym.dequantize()[0, 1]) == 0.0
    assert (asym.dequantize() - w).abs().max() <= float(asym.scale) / 2 + 1e-6


@pytest.mark.parametrize("bits,symmetric,zeros", [(2, True, False), (3, False, True), (4, True, True), (8, False, False)])
def test_packing_round_trip_and_bytes(bits, symmetric, zeros):
    w = torch.randn(8, 64)
    if zeros:
        w[:, torch.rand(64) < 0.7] = 0.0
    q = grid.rtn(w, bits, 16, symmetric)
    rec = encode_layer(q)
    back = decode_layer(rec)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zero, q.zero)
    assert torch.equal(back.dequantize(), q.dequantize())
    if zeros:  # 70% pruned: bitmask + the other codes is smaller
        assert rec["zeros_dropped"] and rec["n_kept"] < 0.4 * 8 * 64
    if not rec.get("zeros_dropped"):
        assert rec["codes"].numel() == 8 * 64 * bits // 8
    assert rec["scale"].dtype == torch.float16 and ("zero" in rec) == (not symmetric)
    assert layer_bytes(rec) < 8 * 64 * 4 * (bits + 2) / 32


def test_pruned_zeros_stack_with_the_packed_codes():
    from compresslab.compress.codecs.packed_int import packed_int_payload
    from compresslab.compress.codecs.stacking import stacked_encodings

    model = nn.Sequential(nn.Linear(64, 8))
    model[0].weight.data[:, ::2] = 0.0
    x = correlated(128, 64).float()
    q = grid.gptq(model[0].weight.detach(), 2 * (x.T @ x).double() / 128, 4, 64, False)
    payload = packed_int_payload(model, {"arch": {"name": "x"}, "input_shape": [64], "num_classes": 8},
                                 {"0": encode_layer(q)})
    assert stacked_encodings(payload) == ["packed_int", "sparse"]
    assert (decode_layer(payload["layers"]["0"]).dequantize()[:, ::2] == 0).all()


def test_awq_scale_formula_and_search_never_worse_than_rtn():
    mean = torch.tensor([0.1, 1.0, 10.0])
    s = awq_scale(mean, 0.5)
    raw = mean.sqrt()
    torch.testing.assert_close(s, raw / (raw.max() * raw.min()).sqrt())
    torch.testing.assert_close(awq_scale(mean, 0.0), torch.ones(3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    x = torch.randn(256, 16) * torch.logspace(-1, 1, 16)  # channels of very different magnitude
    st = capture_stats(model, ["0"], [x])["0"]
    awq = AWQQuant("awq", n_grid=10, bits=3, group_size=8, symmetric=False)
    alpha, s = awq.search(model, ["0"], st)
    w = model[0].weight.detach()
    err = grid.output_error(grid.rtn(w * s, 3, 8, False).dequantize() / s - w, st.xtx)
    assert alpha > 0 and err < grid.output_error(grid.rtn(w, 3, 8, False).dequantize() - w, st.xtx)


def test_smoothquant_scale_balances_the_maxima_and_folding_keeps_the_output():
    xmax, wmax = torch.tensor([8.0, 1.0, 0.0]), torch.tensor([0.5, 2.0, 1.0])
    s = smoothquant_scale(xmax, wmax, 0.5)
    torch.testing.assert_close(s[:2], (xmax[:2] / wmax[:2]).sqrt())
    torch.testing.assert_close(xmax[:2] / s[:2], wmax[:2] * s[:2])  # alpha=0.5: equal maxima after smoothing
    assert float(s[2]) == 1.0
    model = tiny_llama()
    ids = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
        qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
        folded = fold_smoothing(model, qkv, torch.rand(32) + 0.5, ids)
        # X·Wᵀ = (X·diag(s)^-1)·(W·diag(s))ᵀ with diag(s)^-1 folded into the RMSNorm
        assert folded == "model.layers.0.input_layernorm"
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
        o = ["model.layers.0.self_attn.o_proj"]
        assert fold_smoothing(model, o, torch.rand(32) + 0.5, ids) is None  # its input is no module's output


class _Calib:
    """A datamodule stand-in with a calibration set (as the text datamodule provides)."""

    def __init__(self, sequences, batch_size):
        self.sequences, self.batch_size = sequences, batch_size

    def calibration_sequences(self, n, seed=0):
        return self.sequences[:n]


@pytest.mark.parametrize("method", [RTNQuant("rtn", bits=4, group_size=16),
                                    GPTQQuant("gptq", bits=4, group_size=16),
                                    AWQQuant("awq", bits=4, group_size=16, n_grid=5),
                                    SmoothQuant("smoothquant", alpha=0.5)])
def test_methods_on_a_tiny_llama(method):
    model = tiny_llama()
    ids = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    method.validate_student(model, None)
    out_model = method.finalize(model, _Calib(ids, 2))
    rep = method.report()
    assert rep["layers"] == llama_linears(tiny_llama())  # every Linear but lm_head
    assert rep["calibration_batches"] == 2
    assert rep["layer_output_error"] <= rep["rtn_layer_output_error"] * (1.0 + 1e-9)
    with torch.no_grad():
        got = out_model(ids).logits
    assert 0 < (got - ref).abs().max() < 0.5 * ref.abs().max()
    if method.name == "gptq":
        assert rep["output_error_vs_rtn"] < 0.9
    if method.name == "smoothquant":
        assert type(out_model.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
        assert "model.layers.0.self_attn.q_proj" in rep["folded_into"]


@pytest.mark.parametrize("method", [AWQQuant("awq", bits=4, group_size=16, n_grid=5),
                                    SmoothQuant("smoothquant", alpha=0.5)])
def test_smoothing_never_folds_into_a_linear_an_earlier_group_quantized(method):
    """Linear -> in-place ReLU -> Linear: the second Linear's input *is* the first one's output tensor,
    so the first is its producer; it was quantized with the first group, so 1/s goes to run time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.ReLU(inplace=True),
                          nn.Linear(32, 10))
    x = torch.randn(64, 32)
    with torch.no_grad():
        ref = model(x)
    method.include_classifier = True
    out = method.finalize(model, _Calib(x, 16))
    rep = method.report()
    assert rep["folded_into"] == {}  # the one Linear producer was already quantized: nothing folded
    with torch.no_grad():
        assert (out(x) - ref).abs().max() < 0.5 * ref.abs().max()


def test_bad_options_name_the_key():
    with pytest.raises(ConfigError, match="quant.bits"):
        RTNQuant("rtn", bits=9)
    with pytest.raises(ConfigError, match="quant.damp"):
        GPTQQuant("gptq", damp=-1.0)
    with pytest.raises(ConfigError, match="quant.alpha"):
        SmoothQuant("smoothquant", alpha=1.5)
    with pytest.raises(ConfigError, match=r"quant.group_size=7 .*in_features \[32, 64\]"):
        RTNQuant("rtn", group_size=7).validate_student(tiny_llama(), None)


def test_gptq_end_to_end_on_an_mlp_artifact_reloads_and_is_small(make_cfg):
    from compresslab.artifact import load_model_file
    from compresslab.pipeline import run_experiment

    cfg = make_cfg(["student=lenet300", "teacher=none", "quant=gptq", "quant.bits=4", "quant.group_size=4",
                    "quant.num_calibration_batches=2", "measure.fresh_process=true"])
    record = run_experiment(cfg)
    assert record["status"] == "completed", record.get("error")
    s, q = record["student"], record["student"]["quant"]
    assert q["layers"] == ["features.1", "features.3"] and q["calibration_batches"] == 2
    assert q["output_error_vs_rtn"] < 1.0
    # 4-bit codes + one fp16 scale per 4 weights: 8 bits/weight, a quarter of fp32
    assert q["linear_packed_vs_fp32"] == pytest.approx(0.25, abs=0.01)
    assert s["encodings"]["format"] == "compresslab.packed_int/1"
    assert s["measured_in"] == "fresh_process" and s["fresh_process_max_abs_diff"] <= 1e-5
    model = load_model_file(s["artifact"])
    assert type(model.features[1].weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert s["size_bytes"] < 0.3 * record["reference"]["size_bytes"]


def test_bad_group_size_fails_before_training(make_cfg, tmp_path):
    import json

    from compresslab.pipeline import run_experiment

    with pytest.raises(ConfigError, match=r"quant.group_size=128 .*in_features \[64, 300\]"):
        run_experiment(make_cfg(["student=lenet300", "teacher=none", "quant=rtn", "quant.group_size=128"]))
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and "train_time_s" not in (record.get("student") or {})


def test_a_post_training_job_names_the_trained_run_of_an_earlier_job(tmp_path):
    from compresslab.reproduce.suite import earlier_runs

    got = earlier_runs(["quant=gptq", "student.arch.path='{run:train}/artifacts/student_hf'"], {"train": tmp_path})
    assert got == ["quant=gptq", f"student.arch.path='{tmp_path}/artifacts/student_hf'"]
    with pytest.raises(ValueError, match="has not run before it"):
        earlier_runs(["x='{run:later}'"], {"train": tmp_path})
