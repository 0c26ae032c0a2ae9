"""Deployment: BN folding, ONNX export of the artifact kinds, int8 QDQ, ort_int8, ORT as a measured backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compresslab.artifact import load_model_file, read_payload
from compresslab.compress.codecs.fuse_bn import FORMAT as FUSED_FORMAT
from compresslab.compress.codecs.fuse_bn import fused_payload
from compresslab.compress.codecs.fuse_bn import load_payload as load_fused_payload
from compresslab.compress.fuse.bn import check_fuse_combination, fold_bn
from compresslab.deploy import check as chk
from compresslab.deploy import step
from compresslab.deploy.export import export_payload
from compresslab.runtime.interpret import OnnxGraphModule
from compresslab.runtime.ort import OrtModel, make_session, optimized_ops
from compresslab.errors import CheckpointError, ConfigError
from compresslab.measure.core import profile_many
from compresslab.measure.latency import LatencySettings
from compresslab.models import build_model
from compresslab.pipeline import run_experiment

RESNET8 = {"_target_": "compresslab.models.CifarResNet", "depth": 8, "width": 1}
LENET5 = {"_target_": "compresslab.models.LeNet5"}


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


# ---- fuse=bn ------------------------------------------------------------------------------
def test_fold_bn_is_exact_and_the_fused_artifact_reloads(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(build_model(RESNET8, [1, 8, 8], 10))
    x = torch.randn(16, 1, 8, 8)
    fused, pairs = fold_bn(model, x)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(b for _, b in pairs) == sorted(bns)  # every BN of resnet8 follows its conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5, rtol=0)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(model) - params(fused) == sum(model.get_submodule(b).num_features for b in bns)
    ctx = {"arch": RESNET8, "input_shape": [1, 8, 8], "num_classes": 10}
    path = tmp_path / "fused.pt"
    torch.save(fused_payload(fused, pairs, ctx), path)
    with torch.no_grad():
        assert torch.equal(load_model_file(path)(x), fused(x))


def test_fold_linear_bn_and_skip_a_shared_conv_output():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
            self.fc, self.bn1 = nn.Linear(4 * 36, 8), nn.BatchNorm1d(8)

        def forward(self, x):
            y = self.conv(x)
            z = self.bn(y) + y  # the conv output has a second user: folding would change it
            return self.bn1(self.fc(z.flatten(1)))

    net = _randomize_bn(Net())
    x = torch.randn(5, 1, 8, 8)
    fused, pairs = fold_bn(net, x)
    assert pairs == [("fc", "bn1")]
    with torch.no_grad():
        assert torch.allclose(fused(x), net(x), atol=1e-5, rtol=0)


def test_fused_artifact_refuses_paths_that_are_not_a_layer_and_a_bn():
    model = build_model(RESNET8, [1, 8, 8], 10)
    ctx = {"arch": RESNET8, "input_shape": [1, 8, 8], "num_classes": 10}
    payload = fused_payload(model, [], ctx)
    payload["folded"] = [["fc", "conv1"]]
    with pytest.raises(CheckpointError, match="not a conv/linear and a BatchNorm"):
        load_fused_payload(payload)
    payload["folded"] = [["__class__", "bn1"]]
    with pytest.raises(CheckpointError):
        load_fused_payload(payload)
    assert payload["format"] == FUSED_FORMAT


# ---- export -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lenet5_onnx(tmp_path_factory):
    """A dense lenet5 artifact and its export (one export shared by the tests below)."""
    from compresslab.artifact import save_model_file

    tmp_path = tmp_path_factory.mktemp("lenet5")
    torch.manual_seed(0)
    model = build_model(LENET5, [1, 8, 8], 10).eval()
    path = save_model_file(tmp_path / "m.pt", model, LENET5, [1, 8, 8], 10)
    info = export_payload(read_payload(path), tmp_path / "m.onnx")
    return tmp_path, model, path, info


def test_dense_export_has_a_dynamic_batch_and_matches_torch(lenet5_onnx):
    tmp_path, model, path, info = lenet5_onnx
    assert info["kind"] == "dense" and info["lossless"] and info["opset"] == 18
    runtime = OrtModel(tmp_path / "m.onnx")
    for batch in (1, 7):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(runtime(x), model(x), atol=1e-5)
    got = chk.check_pairs({"m": {"pt": str(path), "onnx": str(tmp_path / "m.onnx")}},
                          torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,)), 8)["m"]
    assert got["top1_agreement"] == 1.0 and got["max_abs_diff"] < 1e-5 and got["checked_inputs"] == 20


@pytest.fixture(scope="module")
def int8_resnet8(tmp_path_factory):
    """A PT2E int8 artifact of resnet8 (random weights, BN statistics randomised) and its calibration."""
    from compresslab.compress.codecs import int8 as int8_pt2e
    from compresslab.compress.quant import pt2e

    torch.manual_seed(0)
    model = _randomize_bn(build_model(RESNET8, [1, 8, 8], 10))
    calibration = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    converted, _ = pt2e.quantize_pt2e(model, torch.zeros(2, 1, 8, 8), calibration)
    ctx = {"arch": RESNET8, "input_shape": [1, 8, 8], "num_classes": 10}
    payload = int8_pt2e.make_payload(converted, ctx, {}, "static", lower=False)
    return tmp_path_factory.mktemp("int8"), payload, converted, calibration


def test_int8_exports_as_qdq_with_our_scales(int8_resnet8):
    tmp, payload, converted, calibration = int8_resnet8
    from compresslab.compress.codecs.int8_onnx import complete_qdq

    exact = export_payload(payload, tmp / "exact.onnx", calibration, {"int8_complete_qdq": False})
    full_bytes, added = complete_qdq((tmp / "exact.onnx").read_bytes(), calibration)
    (tmp / "full.onnx").write_bytes(full_bytes)  # what export_payload with int8_complete_qdq=true writes
    assert exact["int8_added_qdq"] == 0 and added == 3  # one per residual add of resnet8
    ops_exact, ops_full = optimized_ops(tmp / "exact.onnx"), optimized_ops(tmp / "full.onnx")
    n_conv = 7 + 2  # resnet8 on 8x8: 7 3x3 convs + 2 1x1 shortcut convs
    assert ops_exact.get("QLinearConv", 0) < n_conv  # the convs before the adds stay fp32
    assert ops_full.get("QLinearConv") == n_conv and ops_full.get("QLinearAdd") == 3
    assert "Conv" not in ops_full and "FusedConv" not in ops_full
    # the exact graph holds PT2E's scales: ORT computes the converted reference graph, up to one
    # quantization step of requantization rounding
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        ref = converted(x)
    got = OrtModel(tmp / "exact.onnx")(x)
    step_size = float(ref.abs().max()) / 50
    assert float((got - ref).abs().max()) < step_size
    import onnx

    scales = {float(np.asarray(onnx.numpy_helper.to_array(t))) for t in onnx.load(str(tmp / "exact.onnx")).graph.initializer
              if onnx.numpy_helper.to_array(t).size == 1 and t.data_type == onnx.TensorProto.FLOAT}
    assert {round(s, 7) for s, _ in payload["qparams"]} <= {round(s, 7) for s in scales}


def test_interpreter_and_ort_int8(tmp_path):
    from compresslab.compress.quant.ort_int8 import quantize_with_ort

    torch.manual_seed(0)
    model = _randomize_bn(build_model(RESNET8, [1, 8, 8], 10))
    calibration = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    data = quantize_with_ort(model, [1, 8, 8], calibration)
    (tmp_path / "q.onnx").write_bytes(data)
    ops = optimized_ops(tmp_path / "q.onnx")
    assert ops.get("QLinearConv") == 9 and ops.get("QLinearAdd") == 3  # U8S8 per-channel fuses fully
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        sim = OnnxGraphModule(data)(x)
    session = make_session(data, 1)
    ort_out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert float((sim - ort_out).abs().max()) < float(ort_out.abs().max()) / 20
    assert float((sim.argmax(1) == ort_out.argmax(1)).float().mean()) >= 0.9


def test_the_interpreter_computes_an_fp32_export_as_torch_does(lenet5_onnx):
    tmp_path, model, _, _ = lenet5_onnx
    x = torch.randn(9, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(OnnxGraphModule((tmp_path / "m.onnx").read_bytes())(x), model(x), atol=1e-5)


def test_interpreter_refuses_operators_outside_its_table():
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->ij")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(CheckpointError, match="Einsum"):
        OnnxGraphModule(model.SerializeToString())
    assert onnx.checker.check_model(model) is None


def test_verdicts():
    lossless = {"kind": "dense", "lossless": True, "max_abs_logit": 4.0, "max_abs_diff": 1e-6, "top1_agreement": 1.0}
    assert chk.verdict("student", lossless, 0.995, 1e-3) is None
    assert "needs 1.0" in chk.verdict("student", {**lossless, "top1_agreement": 0.999}, 0.995, 1e-3)
    assert chk.verdict("student", {**lossless, "max_abs_diff": 0.01}, 0.995, 1e-3) is not None
    lossy = {**lossless, "kind": "int8", "lossless": False, "top1_agreement": 0.99, "max_abs_diff": 0.3}
    assert "min_top1_agreement=0.995" in chk.verdict("student", lossy, 0.995, 1e-3)
    assert chk.verdict("student", {**lossy, "top1_agreement": 0.996}, 0.995, 1e-3) is None


# ---- ONNX Runtime as a backend ---------------------------------------------------------------
def test_ort_threads_follow_the_engine(lenet5_onnx):
    tmp_path = lenet5_onnx[0]
    runtime = OrtModel(tmp_path / "m.onnx")
    from torch.utils.benchmark import Timer

    for n in (1, 2):
        Timer("m(x)", globals={"m": runtime, "x": torch.randn(4, 1, 8, 8)}, num_threads=n).timeit(2)
    assert sorted(runtime.sessions) == [1, 2]
    assert runtime.sessions[2].get_session_options().intra_op_num_threads == 2


def test_backends_are_timed_in_the_same_rounds_with_their_own_reference():
    big, small = nn.Linear(256, 256), nn.Linear(256, 8)
    models = {"reference": nn.Sequential(big, nn.ReLU(), nn.Linear(256, 8)).eval(), "student": small.eval()}
    slow = nn.Sequential(nn.Linear(256, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 8)).eval()
    backends = {"onnxruntime": {"reference": slow, "student": small}}
    settings = LatencySettings(warmup=1, rounds=3, round_ms=2.0, threads_bN=1)
    rows = profile_many(models, torch.randn(1, 256), torch.randn(32, 256), settings, backends=backends)
    s = rows["student"]
    ort = s["backends"]["onnxruntime"]
    assert set(s["backends"]) == {"torch", "onnxruntime"}
    assert ort["speedup"] > 3  # relative to the slow reference of its own backend
    assert s["backends"]["torch"]["speedup"] == s["speedup"]
    assert s["deployed_backend"] in ("torch", "onnxruntime") and s["deployed_speedup"] >= s["speedup"]
    assert "student@onnxruntime" not in rows and ort["threads_bN"] == 1


def test_validate_refuses_impossible_settings(make_cfg):
    with pytest.raises(ConfigError, match="export.onnx=true"):
        step.validate(make_cfg(["measure.backends=[torch,onnxruntime]"]))
    with pytest.raises(ConfigError, match="unknown backend"):
        step.validate(make_cfg(["export.onnx=true", "measure.backends=[torch,tensorrt]"]))
    with pytest.raises(ConfigError, match="must include torch"):
        step.validate(make_cfg(["export.onnx=true", "measure.backends=[onnxruntime]"]))
    with pytest.raises(ConfigError, match="fold BatchNorm themselves"):  # the method's check, in pipeline.validate
        check_fuse_combination(make_cfg(["fuse=bn", "quant=ptq_int8"]))
    with pytest.raises(ConfigError, match="opset"):
        step.validate(make_cfg(["export.onnx=true", "export.opset=9"]))
    step.validate(make_cfg(["export=onnx", "measure.backends=[torch,onnxruntime]", "fuse=bn"]))


# ---- the pipeline -------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_exports_checks_and_times_onnxruntime(make_cfg):
    cfg = make_cfg(["teacher=none", "student=convnet", "fuse=bn", "export.onnx=true",
                    "measure.backends=[torch,onnxruntime]", "measure.fresh_process=true"])
    record = run_experiment(cfg)
    s, ref = record["student"], record["reference"]
    assert s["fuse"]["bn_folded"] == 4 and s["fuse"]["bn_left"] == 0 and s["fuse"]["max_abs_diff"] < 1e-5
    assert record["axes"]["fuse"] == "bn" and "bn_folded" not in s  # only the block (schema v3)
    assert s["params"] < ref["params"]  # BN weights and biases gone, conv biases added
    assert s["onnx"]["kind"] == "fused" and s["onnx"]["top1_agreement"] == 1.0 and s["onnx"]["check_passed"]
    assert s["onnx"]["checked_in"] == "fresh_process" and ref["onnx"]["kind"] == "dense"
    ort = s["backends"]["onnxruntime"]
    assert ort["latency_ms_b1"] > 0 and ort["latency_ms_bN"] > 0 and "speedup" in ort
    assert ort["acc_top1"] == pytest.approx(s["acc_top1"])
    assert s["deployed_backend"] in ("torch", "onnxruntime") and s["deployed_speedup"] > 0
    run_dir = Path(cfg.paths.run_dir)
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["student"]["onnx"]["max_abs_diff"] == s["onnx"]["max_abs_diff"]
    assert (run_dir / "artifacts" / "student.onnx").stat().st_size == s["onnx"]["size_bytes"]


def test_the_check_runs_in_a_fresh_process_and_names_what_failed(lenet5_onnx):
    tmp_path, _, path, info = lenet5_onnx
    pair = {"student": {"pt": str(path), "onnx": str(tmp_path / "m.onnx")}}
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    fresh = chk.run_check(pair, x, y)["student"]
    assert fresh["checked_in"] == "fresh_process"
    assert fresh["max_abs_diff"] == chk.check_pairs(pair, x, y)["student"]["max_abs_diff"]
    figures = {**info, **fresh}
    assert chk.verdict("student", figures, 0.995, 1e-3) is None
    if figures["max_abs_diff"] > 0:  # bit-exact ORT output passes even a zero tolerance
        assert "student.onnx (dense, lossless) differs" in chk.verdict("student", figures, 0.995, 0.0)
    with pytest.raises(chk.ExportCheckError, match="failed to load/run"):
        chk.run_check({"student": {"pt": str(path), "onnx": str(tmp_path / "missing.onnx")}}, x, y)
