"""Int8 PT2E quantization (ptq_int8 / dynamic_int8 / qat_int8) and the safe reloading of every
artifact format of the quantization/low-bit/weight-sharing/low-rank methods."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compresslab.artifact import atomic_torch_save, load_model_file, model_payload, read_payload
from compresslab.compress.codecs import int8 as int8_pt2e
from compresslab.compress.common import hide_epoch_from_selection
from compresslab.compress.quant import pt2e
from compresslab.compress.quant.qat import QATCallback, QATInt8, fake_quant_weight_int8, strip_qat
from compresslab.errors import CheckpointError
from compresslab.measure import evaluate_accuracy
from compresslab.measure.core import count_macs, count_params
from compresslab.models import build_model
from compresslab.pipeline import build_datamodule, run_experiment

SHAPE = (1, 8, 8)
RESNET8 = {"_target_": "compresslab.models.CifarResNet", "depth": 8}


def _busy_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (so folding matters)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=g)
            m.bias.data = 0.2 * torch.randn(m.num_features, generator=g)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, *SHAPE, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def int8_case(tmp_path_factory):
    torch.manual_seed(0)
    model = _busy_bn(build_model(RESNET8, SHAPE, 10))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, *SHAPE, generator=g) for _ in range(4)]
    converted, info = pt2e.quantize_pt2e(model, torch.zeros(2, *SHAPE), calib, "static")
    ctx = {"arch": RESNET8, "input_shape": list(SHAPE), "num_classes": 10}
    payload = int8_pt2e.make_payload(converted, ctx, {}, "static", True)
    path = tmp_path_factory.mktemp("int8") / "student.pt"
    atomic_torch_save(payload, path)
    dense = tmp_path_factory.mktemp("int8") / "dense.pt"
    atomic_torch_save(model_payload(model, RESNET8, SHAPE, 10), dense)
    return {"model": model, "converted": converted, "path": path, "dense": dense, "info": info,
            "x": torch.randn(64, *SHAPE, generator=g), "loaded": load_model_file(path)}


def test_int8_artifact_runs_onednn_int8_ops_close_to_fp32(int8_case):
    loaded = int8_case["loaded"]
    assert loaded.compute == "int8"
    ops = pt2e.int8_ops(loaded.graph)
    assert "onednn.qconv_pointwise.default" in ops and "onednn.qlinear_pointwise.default" in ops
    x = int8_case["x"]
    with torch.no_grad():
        ref = int8_case["model"](x)
        out = loaded(x)
        qdq = int8_case["converted"](x)
    scale = ref.abs().max()
    # 8-bit activations/weights: error a few percent of the output range, not more
    assert (out - ref).abs().max() <= 0.08 * scale
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    # the oneDNN kernels compute what the q/dq reference graph describes (up to requantization)
    assert (out - qdq).abs().max() <= 0.03 * scale
    # batch 1 works too (dynamic batch dimension)
    with torch.no_grad():
        assert torch.allclose(loaded(x[:1]), out[:1], atol=1e-5)


def test_public_lowering_keeps_the_batch_dynamic_and_refuses_a_batch_specialized_graph(monkeypatch):
    mlp = build_model({"_target_": "compresslab.models.MLP", "hidden": [16]}, SHAPE, 10).eval()
    example = torch.zeros(2, *SHAPE)
    converted, _ = pt2e.quantize_pt2e(mlp, example, [torch.randn(8, *SHAPE)], "static")
    lowered = pt2e.lower_x86(converted, example)  # torchao's public lower_pt2e_quantized_to_x86
    assert pt2e.int8_ops(lowered) == ["onednn.qlinear_pointwise.default"]
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():  # the flatten's reshape reads the batch size at run time
        assert torch.allclose(lowered(x)[:1], lowered(x[:1]), atol=1e-6)
    monkeypatch.setattr(pt2e, "_BATCH_SOURCE", "")  # torchao's export alone bakes in the example's batch
    with pytest.raises(RuntimeError, match="specialized the batch dimension to 2"):
        pt2e.lower_x86(converted, example)


def test_int8_artifact_sizes_params_and_macs(int8_case):
    model = int8_case["model"]
    payload = read_payload(int8_case["path"])
    stored = int8_pt2e.stored_constants(payload)
    int8 = [t for t in stored.values() if t.dtype == torch.int8 and t.dim() >= 2]
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(t.numel() for t in int8) == sorted(w.numel() for w in weights)  # every weight is int8
    ratio = int8_case["dense"].stat().st_size / int8_case["path"].stat().st_size
    assert ratio >= 3.5
    loaded = int8_case["loaded"]
    x1 = torch.randn(1, *SHAPE)
    assert count_macs(loaded, x1) == count_macs(model, x1)  # oneDNN ops counted like their fp32 twins
    n_weights = sum(w.numel() for w in weights)
    assert n_weights < count_params(loaded)["params"] < n_weights + 2000  # + folded biases


def test_pruned_int8_weights_are_stored_sparse_and_decode_exactly(int8_case, tmp_path):
    model = build_model(RESNET8, SHAPE, 10)
    model.load_state_dict(int8_case["model"].state_dict())
    with torch.no_grad():  # 90% magnitude pruning of every conv (as prune=agp leaves them)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight[m.weight.abs() < m.weight.abs().quantile(0.9)] = 0.0
    g = torch.Generator().manual_seed(1)
    converted, _ = pt2e.quantize_pt2e(model.eval(), torch.zeros(2, *SHAPE),
                                      [torch.randn(32, *SHAPE, generator=g) for _ in range(4)], "static")
    payload = int8_pt2e.make_payload(converted, {"arch": RESNET8, "input_shape": list(SHAPE), "num_classes": 10},
                                {}, "static", False)
    int8_weights = {k: t for k, t in pt2e.graph_constants(converted).items() if t.dtype == torch.int8 and t.dim() == 4}
    assert int8_weights and all((t == 0).float().mean() >= 0.89 for t in int8_weights.values())
    assert set(int8_weights) <= set(int8_pt2e.sparse_constants(payload))  # zeros survive quantization
    stored = int8_pt2e.stored_constants(payload)
    for name, t in int8_weights.items():
        assert torch.equal(stored[name], t)
    path = tmp_path / "pruned_int8.pt"
    atomic_torch_save(payload, path)
    # conv weights: 1 bit of mask + 8 bits per kept weight instead of 8 bits each
    assert int8_case["path"].stat().st_size / path.stat().st_size > 2.5
    loaded = load_model_file(path)
    x = int8_case["x"]
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))


def test_int8_artifact_refuses_a_different_architecture(int8_case, tmp_path):
    payload = read_payload(int8_case["path"])
    payload["arch"] = {"_target_": "compresslab.models.CifarResNet", "depth": 14}
    atomic_torch_save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not match"):
        load_model_file(tmp_path / "bad.pt")


def test_dynamic_int8_quantizes_linear_layers():
    torch.manual_seed(0)
    arch = {"_target_": "compresslab.models.MLP", "hidden": [64, 32]}
    model = build_model(arch, SHAPE, 10).eval()
    converted, _ = pt2e.quantize_pt2e(model, torch.zeros(2, *SHAPE), [], "dynamic")
    payload = int8_pt2e.make_payload(converted, {"arch": arch, "input_shape": list(SHAPE), "num_classes": 10}, {},
                                "dynamic", True)
    loaded = int8_pt2e.load_payload(payload)
    assert pt2e.int8_ops(loaded.graph) == ["onednn.qlinear_pointwise.tensor"]
    x = torch.randn(16, *SHAPE)
    with torch.no_grad():
        ref, out = model(x), loaded(x)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def _manual_fake_quant(w: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(w)
    for c in range(w.shape[0]):  # per output channel, symmetric int8 as in PerChannelMinMaxObserver
        s = max(float(w[c].abs().max()) / 127.5, 2 ** -12)
        out[c] = torch.clamp(torch.round(w[c] / s), -128, 127) * s
    return out


def test_qat_fake_quant_matches_manual_int8_and_passes_straight_through_gradients():
    torch.manual_seed(0)
    model = build_model({"_target_": "compresslab.models.LeNet5"}, SHAPE, 10)
    method = QATInt8("qat_int8", quantize_activations=False)
    method.prepare(model, None)
    method.set_epoch(0, 5)
    assert method.fake_quant and method.observe and not method.freeze_bn
    conv = model.features[0]
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        expected = F.conv2d(x, _manual_fake_quant(conv.weight), conv.bias, padding=2)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    # clipped STE (as torch's FakeQuantize): the latent weight receives the gradient of the
    # quantized weight where round(w/s) is inside [-128, 127], zero where it was clamped
    w = conv.weight.detach()
    wq = _manual_fake_quant(w).requires_grad_(True)
    F.conv2d(x, wq, conv.bias.detach(), padding=2).square().sum().backward()
    conv(x).square().sum().backward()
    s = (w.reshape(w.shape[0], -1).abs().amax(1) / 127.5).view(-1, 1, 1, 1)
    inside = (torch.round(w / s) <= 127) & (torch.round(w / s) >= -128)
    assert not inside.all()  # each channel's max maps to 127.5 -> 128 -> clamped
    assert torch.allclose(conv.weight.grad, wq.grad * inside, atol=1e-5)
    assert torch.equal(fake_quant_weight_int8(torch.zeros(3, 2)), torch.zeros(3, 2))


def test_qat_schedule_freezes_observers_and_bn_and_strips_cleanly():
    torch.manual_seed(0)
    model = build_model(RESNET8, SHAPE, 10)
    keys = set(model.state_dict())
    method = QATInt8("qat_int8", start_epoch=1, freeze_observer_epoch=-2, freeze_bn_epoch=-1)
    method.prepare(model, None)
    cb = QATCallback(method)

    class _T:  # the trainer attributes the callback reads
        max_epochs, checkpoint_callbacks, callback_metrics = 4, [], {}

    class _M:
        pass

    trainer, pl_module = _T(), _M()
    pl_module.model = model.train()
    states = []
    for epoch in range(4):
        trainer.current_epoch = epoch
        cb.on_train_epoch_start(trainer, pl_module)
        cb.on_train_batch_start(trainer, pl_module, None, 0)
        model(torch.randn(8, *SHAPE))
        states.append((method.fake_quant, method.observe, model.bn1.training, method.eligible))
    assert states == [(False, True, True, False), (True, True, True, False), (True, False, True, False),
                      (True, False, False, True)]
    assert method.schedule["qat_select_from_epoch"] == 3
    ranges = model.conv1.qat_act_range
    assert ranges[2] == 1 and ranges[0] < 0 < ranges[1]  # the input range was observed
    strip_qat(model)
    assert set(model.state_dict()) == keys and type(model.conv1) is nn.Conv2d


def test_hide_epoch_from_selection_sets_worst_monitored_value():
    class _CB:
        monitor, mode = "val/acc", "max"

    class _T:
        checkpoint_callbacks = [_CB()]
        callback_metrics = {"val/acc": torch.tensor(0.9)}

    t = _T()
    hide_epoch_from_selection(t)
    assert t.callback_metrics["val/acc"] == float("-inf")


def test_ptq_int8_pipeline_run_reports_int8_backend_and_measures_the_artifact(make_cfg):
    cfg = make_cfg(["quant=ptq_int8", "quant.num_calibration_batches=2", "teacher=none", "measure.fresh_process=true"])
    record = run_experiment(cfg)
    s, q = record["student"], record["student"]["quant"]
    assert q["backend"] == "pt2e_x86_onednn" and q["compute"] == "int8" and q["fallback_reason"] is None
    # timed in a fresh process that rebuilt and lowered the int8 graph from the file alone
    assert s["measured_in"] == "fresh_process" and s["fresh_process_max_abs_diff"] <= 1e-5
    assert "int8" in s["dtypes"] and "int8" not in record["reference"]["dtypes"]
    assert s["size_ratio"] >= 3.0  # lenet5: 21k weights, so metadata weighs in a little
    assert q["int8_calibration_batches"] == 2
    dm = build_datamodule(cfg)
    dm.setup()
    model = load_model_file(s["artifact"])
    assert s["acc_top1"] == pytest.approx(evaluate_accuracy(model, dm.test_dataloader()))
    assert q["int8_agreement_top1"] >= 0.9


@pytest.mark.slow
def test_distill_kd_prune_agp_qat_int8_end_to_end(make_cfg):
    cfg = make_cfg(["distill=kd", "prune=agp", "quant=qat_int8", "student.epochs=3", "prune.start=0",
                    "prune.end=1", "prune.final_sparsity=0.5"])
    record = run_experiment(cfg)
    s = record["student"]
    assert record["status"] == "completed"
    assert s["quant"]["backend"] == "pt2e_x86_onednn" and s["quant"]["compute"] == "int8"
    assert s["quant"]["qat_start_epoch"] == 0 and s["quant"]["qat_freeze_bn_epoch"] == 1
    model = load_model_file(s["artifact"])
    assert isinstance(model, int8_pt2e.Int8Model)
    # the pruned zeros survive int8 quantization (int8 zero is exact)
    assert s["sparsity"] >= 0.4
    assert count_params(model)["sparsity"] == pytest.approx(s["sparsity"])


def _artifacts(tmp_path) -> dict:
    """One artifact of each format of this package, with the in-process outputs."""
    from compresslab.compress.quant.lowbit import LowBit
    from compresslab.compress.lowrank.svd import SVDLowRank
    from compresslab.compress.quant.weight_sharing import WeightSharing

    torch.manual_seed(0)
    lenet = {"_target_": "compresslab.models.LeNet5"}
    ctx = {"arch": lenet, "input_shape": list(SHAPE), "num_classes": 10}
    out = {}
    lowbit = LowBit("lowbit", bits=3, act_bits=8)
    m = lowbit.prepare(build_model(lenet, SHAPE, 10), None)
    m(torch.randn(16, *SHAPE))  # observe activation ranges
    out["lowbit"] = lowbit.export(lowbit.finalize(m.eval(), None), ctx)
    ws = WeightSharing("ws", bits_fc=4, bits_conv=4)
    m = build_model(lenet, SHAPE, 10)
    with torch.no_grad():
        m.classifier[0].weight[:, ::2] = 0.0  # some pruned zeros
    out["shared"] = ws.export(ws.finalize(m.eval(), None), ctx)
    lr = SVDLowRank("svd", rank_ratio=0.5, when="before")
    m = lr.prepare(build_model(lenet, SHAPE, 10), None)
    out["lowrank"] = lr.export(m.eval(), ctx)
    paths = {}
    for name, payload in out.items():
        paths[name] = tmp_path / f"{name}.pt"
        atomic_torch_save(payload, paths[name])
    return paths


def test_every_artifact_reloads_in_a_fresh_process_with_identical_outputs(int8_case, tmp_path):
    paths = {"int8": int8_case["path"], **_artifacts(tmp_path)}
    x = torch.randn(7, *SHAPE)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch; from compresslab.artifact import load_model_file\n"
        "x = torch.load(sys.argv[1], weights_only=True)\n"
        "for p in sys.argv[2:]:\n"
        "    torch.save(load_model_file(p)(x).detach(), p + '.out')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"), *map(str, paths.values())], check=True)
    for name, path in paths.items():
        with torch.no_grad():
            expected = (int8_case["loaded"] if name == "int8" else load_model_file(path))(x)
        got = torch.load(str(path) + ".out", weights_only=True)
        assert torch.equal(got, expected), name
