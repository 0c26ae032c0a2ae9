"""Low-bit weights: bit-packing against independent encoders, the quantizers against their papers'
formulas, straight-through gradients, and the bit-packed artifact's sizes and round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compresslab.artifact import atomic_torch_save, load_model_file
from compresslab.compress.codecs import bitpack
from compresslab.compress.quant.lowbit import LowBit
from compresslab.compress.quant.quantizers import dequantize_codes, parse_bits, quantize_weight
from compresslab.errors import ConfigError
from compresslab.models import build_model
from compresslab.pipeline import run_experiment

SHAPE = (1, 8, 8)
LENET5 = {"_target_": "compresslab.models.LeNet5"}
CTX = {"arch": LENET5, "input_shape": list(SHAPE), "num_classes": 10}


def _pack_reference(codes: list[int], bits: int) -> bytes:
    """Independent LSB-first packer: one big integer, code i at bit offset i*bits."""
    acc = 0
    for i, c in enumerate(codes):
        acc |= c << (i * bits)
    return acc.to_bytes(math.ceil(len(codes) * bits / 8), "little")


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_matches_an_independent_packer_and_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 8, 9, 1001):
        codes = torch.randint(0, 1 << bits, (n,), generator=g)
        packed = bitpack.pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        assert bytes(packed.tolist()) == _pack_reference(codes.tolist(), bits)
        assert torch.equal(bitpack.unpack_bits(packed, bits, n), codes)


def test_pack_trits_stores_five_per_byte_and_round_trips():
    codes = torch.tensor([2, 0, 1, 1, 2, 1, 2])  # byte0 = 2 + 0*3 + 1*9 + 1*27 + 2*81, byte1 = 1 + 2*3
    packed = bitpack.pack_trits(codes)
    assert packed.tolist() == [2 + 9 + 27 + 162, 1 + 6]
    many = torch.randint(0, 3, (1003,), generator=torch.Generator().manual_seed(0))
    assert bitpack.pack_trits(many).numel() == 201
    assert torch.equal(bitpack.unpack_trits(bitpack.pack_trits(many), 1003), many)
    with pytest.raises(ValueError):
        bitpack.pack_trits(torch.tensor([3]))


def test_flatten_state_round_trips_mixed_dtypes():
    state = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).half(), "d": torch.tensor(1.5)}
    blobs, index = bitpack.flatten_state(state)
    assert set(blobs) == {"float32", "int64", "float16"}
    back = bitpack.unflatten_state(blobs, index)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_uniform_quantizer_codes_scales_and_mse_choice(bits):
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(bits))
    codes, scale, deq = quantize_weight(w, "uniform", bits, True, torch.float32)
    half = 1 << (bits - 1)
    assert codes.min() >= 0 and codes.max() < 2 * half and scale.shape == (6,)
    assert torch.equal(deq, (codes - half).float() * scale.view(-1, 1, 1, 1))
    assert torch.equal(dequantize_codes(codes.reshape(-1), scale, "uniform", bits, w.shape), deq)
    # the searched clipping is never worse than plain max-scaling (one of the candidates)
    s_max = w.reshape(6, -1).abs().amax(1) / (half - 0.5)
    plain = torch.clamp(torch.round(w / s_max.view(-1, 1, 1, 1)), -half, half - 1) * s_max.view(-1, 1, 1, 1)
    assert ((deq - w) ** 2).sum() <= ((plain - w) ** 2).sum() + 1e-6


def test_ternary_follows_twn_and_binary_follows_scaled_sign():
    w = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    w[0, :10] = 0.0
    codes, scale, deq = quantize_weight(w, "ternary", 2, True, torch.float32)
    for c in range(4):
        delta = 0.7 * w[c].abs().mean()
        keep = w[c].abs() > delta
        alpha = w[c].abs()[keep].mean()
        assert scale[c] == pytest.approx(float(alpha), rel=1e-6)
        assert torch.allclose(deq[c], alpha * torch.sign(w[c]) * keep, rtol=1e-6, atol=0)
    assert torch.all(deq[0, :10] == 0)  # pruned zeros stay zero under TWN
    codes, scale, deq = quantize_weight(w, "binary", 1, True, torch.float32)
    assert torch.allclose(scale, w.abs().mean(1))
    assert torch.equal(deq, torch.where(w >= 0, 1.0, -1.0) * scale.view(-1, 1))
    assert set(codes.unique().tolist()) <= {0, 1}


def test_bits_config_values():
    assert parse_bits(2) == ("uniform", 2) and parse_bits("8") == ("uniform", 8)
    assert parse_bits("ternary") == ("ternary", 2) and parse_bits("binary") == ("binary", 1)
    for bad in (1, 16, "quaternary"):
        with pytest.raises(ConfigError):
            parse_bits(bad)


@pytest.mark.parametrize("bits", [4, "ternary", "binary"])
def test_straight_through_gradient_reaches_the_latent_weights(bits):
    torch.manual_seed(0)
    model = build_model(LENET5, SHAPE, 10)
    method = LowBit("lowbit", bits=bits)
    method.prepare(model, None)
    conv = model.features[0]
    x = torch.randn(4, *SHAPE)
    _, _, deq = quantize_weight(conv.weight, method.scheme, method.bits, True, method.scale_dtype)
    wq = deq.clone().requires_grad_(True)
    out = conv(x)
    assert torch.allclose(out, F.conv2d(x, deq, conv.bias, padding=2), atol=1e-6)  # forward uses wq
    out.square().sum().backward()
    F.conv2d(x, wq, conv.bias.detach(), padding=2).square().sum().backward()
    assert torch.allclose(conv.weight.grad, wq.grad, atol=1e-5)  # identity STE


@pytest.mark.parametrize("bits,target", [(2, 12), ("ternary", 14), ("binary", 25)])
def test_bitpacked_artifact_sizes_and_exact_reload(bits, target, tmp_path):
    torch.manual_seed(0)
    method = LowBit("lowbit", bits=bits)
    method.bind(CTX)  # the pipeline's context: the report is computed at finalize
    model = method.prepare(build_model(LENET5, SHAPE, 10), None)
    model = method.finalize(model.eval(), None)
    payload = method.export(model, CTX)
    stats = method.report()
    # independent byte count: packed codes + one fp16 scale per output channel, per layer
    weights = [m.weight for n, m in model.named_modules() if n in method.layer_names]
    per_weight = {"ternary": None, "binary": 1}.get(bits, bits)
    expected = sum((math.ceil(w.numel() / 5) if per_weight is None else math.ceil(w.numel() * per_weight / 8))
                   + 2 * w.shape[0] for w in weights)
    assert stats["quantized_layers_encoded_bytes"] == expected
    assert payload["codes"].numel() + 2 * payload["scales"].numel() == expected
    assert stats["size_ratio_quantized_layers"] == pytest.approx(sum(4 * w.numel() for w in weights) / expected)
    assert stats["size_ratio_quantized_layers"] >= target
    atomic_torch_save(payload, tmp_path / "lowbit.pt")
    loaded = load_model_file(tmp_path / "lowbit.pt")
    x = torch.randn(9, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
        for name, m in loaded.named_modules():
            if name in method.layer_names:
                _, _, deq = quantize_weight(model.get_submodule(name).weight, method.scheme, method.bits)
                assert torch.equal(m.weight, deq)


def test_activation_quantization_is_saved_and_reapplied(tmp_path):
    torch.manual_seed(0)
    method = LowBit("lowbit", bits=4, act_bits=4)
    model = method.prepare(build_model(LENET5, SHAPE, 10), None)
    model.train()
    model(torch.randn(32, *SHAPE))  # EMA ranges observed
    model.eval()
    payload = method.export(method.finalize(model, None), CTX)
    assert len(payload["act_ranges"]) == len(method.layer_names)
    atomic_torch_save(payload, tmp_path / "a.pt")
    loaded = load_model_file(tmp_path / "a.pt")
    x = torch.randn(9, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
        assert len(torch.unique(loaded.features[0](x).detach())) > 16  # outputs are not 4-bit: only inputs are


def test_lowbit_pipeline_reports_simulated_compute_and_real_file_size(make_cfg):
    record = run_experiment(make_cfg(["quant=binary", "teacher=none"]))
    s = record["student"]
    assert s["quant"]["compute"] == "simulated" and s["quant"]["scheme"] == "binary"
    assert s["quant"]["fallback_reason"] is None
    assert s["quant"]["size_ratio_quantized_layers"] >= 25
    assert s["size_bytes"] < record["reference"]["size_bytes"] / 8  # the saved file really is small
    assert record["axes"]["quant"] == "binary"
