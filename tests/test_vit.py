"""Small ViT / DeiT models, attention with explicit projections, and the fake-quant methods on attention."""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock

from compresslab.artifact import load_model_file
from compresslab.compress.base import build_methods
from compresslab.compress.common import select_layers
from compresslab.compress.quant.swap import SwapHooks, is_swapped, swap_forward
from compresslab.errors import ConfigError
from compresslab.models import DeiT, ViT, build_model
from compresslab.models.attention import ExplicitAttention, explicit_attention

PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.mark.parametrize("batch_first,kdim", [(True, None), (False, 12)])
def test_explicit_attention_computes_what_multihead_attention_computes(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    ea = ExplicitAttention(16, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
    ea.load_state_dict(mha.state_dict())  # MHA's in_proj_weight / q_proj_weight keys load
    ea.eval()
    q = torch.randn(3, 5, 16)
    k = torch.randn(3, 7, kdim or 16)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -2:] = True
    mask = torch.zeros(5, 7).masked_fill(torch.rand(5, 7) < 0.2, float("-inf"))
    for need_weights in (True, False):
        a = mha(q, k, k, key_padding_mask=pad, attn_mask=mask, need_weights=need_weights)
        b = ea(q, k, k, key_padding_mask=pad, attn_mask=mask, need_weights=need_weights)
        torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=1e-5)
        if need_weights:
            torch.testing.assert_close(b[1], a[1], atol=1e-6, rtol=1e-5)
        else:
            assert b[1] is None


class _Attn(nn.Module):
    """A model that is one ``nn.MultiheadAttention`` (what torchvision's ViT blocks hold)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_the_forward_swap_never_reaches_multihead_attention_and_the_selector_refuses_it():
    torch.manual_seed(0)
    model, x = _Attn().eval(), torch.randn(2, 5, 16)
    before = model(x)
    swap_forward(model.attn.out_proj, SwapHooks(weight=lambda m, w: torch.zeros_like(w)))
    torch.testing.assert_close(model(x), before)  # the bug: MHA reads out_proj.weight itself
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        select_layers(model)


FAKE_QUANT = {
    "qat_int8": ["quant=qat_int8", "quant.quantize_activations=false"],
    "lowbit": ["quant=lowbit", "quant.bits=2"],
    "ternary": ["quant=ternary"],
    "binary": ["quant=binary"],
    "lsq": ["quant=lsq", "quant.first_last_bits=null"],
    "pact": ["quant=pact", "quant.first_last_bits=null"],
}


@pytest.mark.parametrize("method_name", list(FAKE_QUANT))
def test_each_fake_quant_method_changes_the_output_of_multihead_attention(method_name, make_cfg):
    torch.manual_seed(0)
    model, x = _Attn(), torch.randn(4, 5, 16)
    before = model.eval()(x)
    (method,) = build_methods(make_cfg(FAKE_QUANT[method_name]))
    model = method.prepare(model, None)
    if hasattr(method, "set_epoch"):
        method.set_epoch(0, 1)
    model.train()(x)  # LSQ/PACT initialise their steps at the first training batch
    after = model.eval()(x)
    attn = model.attn
    assert isinstance(attn, ExplicitAttention)
    assert all(is_swapped(getattr(attn, p)) for p in PROJ)
    assert (after - before).abs().max() > 1e-3


def test_vit_and_deit_build_for_each_input_size_and_deit_averages_its_two_heads():
    for shape, tokens in [((1, 8, 8), 16), ((1, 28, 28), 49), ((3, 32, 32), 64)]:
        vit = build_model({"_target_": "compresslab.models.ViT", "depth": 1}, shape, 10)
        assert vit.seq_length == tokens + 1 and vit(torch.randn(2, *shape)).shape == (2, 10)
        assert not any(isinstance(m, nn.MultiheadAttention) for m in vit.modules())
    deit = DeiT((1, 8, 8), 10, depth=1, heads=2, width=16).eval()
    nn.init.normal_(deit.heads.head.weight)
    nn.init.normal_(deit.head_dist.weight)
    feats = {}
    deit.encoder.register_forward_hook(lambda m, i, o: feats.setdefault("z", o))
    out = deit(x := torch.randn(3, 1, 8, 8))
    z = feats["z"]
    torch.testing.assert_close(out, (deit.heads(z[:, 0]) + deit.head_dist(z[:, 1])) / 2)
    assert deit.encoder.pos_embedding.shape[1] == 16 + 2 and deit(x).shape == (3, 10)
    with pytest.raises(ConfigError, match="patch_size"):
        ViT((1, 8, 8), 10, patch_size=3)
    # torchvision's encoder block (what student=torchvision arch.name=vit_b_16 holds) converts exactly
    block = EncoderBlock(2, 16, 32, 0.0, 0.0, partial(nn.LayerNorm, eps=1e-6)).eval()
    z = torch.randn(2, 5, 16)
    ref = block(z)
    assert explicit_attention(block) is block and isinstance(block.self_attention, ExplicitAttention)
    torch.testing.assert_close(block(z), ref, atol=1e-5, rtol=1e-5)

def _distinct_per_row(w: torch.Tensor) -> int:
    return max(len(torch.unique(row)) for row in w.flatten(1))


@pytest.mark.slow
def test_vit_lowbit_2_artifact_has_at_most_4_values_per_channel_in_every_attention_projection(make_cfg):
    from compresslab.pipeline import run_experiment

    cfg = make_cfg(["student=vit_tiny", "teacher=none", "quant=lowbit", "quant.bits=2",
                    "student.arch.depth=2", "student.arch.width=32"])
    result = run_experiment(cfg)
    assert result["status"] == "completed", result.get("error")
    model = load_model_file(result["student"]["artifact"])
    projections = [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in PROJ]
    assert len(projections) == 4 * 2
    for name, module in projections:
        assert _distinct_per_row(module.weight) <= 4, name
    per_layer = result["student"]["quant"]["size_ratio_per_layer"]  # the per-layer report lists them
    assert {n for n, _ in projections} <= set(per_layer)


@pytest.mark.slow
def test_deit_artifact_keeps_its_distillation_head_and_reloads_in_a_fresh_process(make_cfg, tmp_path):
    from compresslab.pipeline import run_experiment

    cfg = make_cfg(["student=deit_tiny", "teacher=convnet", "distill=deit", "student.arch.depth=1"])
    result = run_experiment(cfg)
    assert result["status"] == "completed", result.get("error")
    path = result["student"]["artifact"]
    model = load_model_file(path).eval()
    assert isinstance(model, DeiT) and model.head_dist.weight.abs().sum() > 0
    x = torch.randn(4, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; from compresslab.artifact import load_model_file; "
            "m = load_model_file(sys.argv[1]).eval(); x = torch.load(sys.argv[2]); "
            "print(type(m).__name__, m.head_dist.out_features); torch.save(m(x), sys.argv[3])")
    out = subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["DeiT", "10"]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x), rtol=0, atol=0)
