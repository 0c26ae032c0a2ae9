"""Small ViT / DeiT models, attention with explicit projections, and the fake-quant methods on attention."""

from __future__ import annotations

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


def _completed_run(make_cfg, overrides: list[str]) -> dict:
    from compresslab.pipeline import run_experiment

    result = run_experiment(make_cfg(overrides))
    assert result["status"] == "completed", result.get("error")
    return result


@pytest.mark.slow
def test_vit_lowbit_2_artifact_has_at_most_4_values_per_channel_in_every_attention_projection(make_cfg):
    result = _completed_run(make_cfg, ["student=vit_tiny", "teacher=none", "quant=lowbit", "quant.bits=2",
                                       "student.arch.depth=2", "student.arch.width=32"])
    model = load_model_file(result["student"]["artifact"])
    projections = [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in PROJ]
    assert len(projections) == 4 * 2
    for name, module in projections:
        assert _distinct_per_row(module.weight) <= 4, name
    per_layer = result["student"]["quant"]["size_ratio_per_layer"]  # the per-layer report lists them
    assert {n for n, _ in projections} <= set(per_layer)


@pytest.mark.slow
def test_deit_artifact_keeps_its_distillation_head_and_reloads_in_a_fresh_process(make_cfg):
    result = _completed_run(make_cfg, ["student=deit_tiny", "teacher=convnet", "distill=deit", "student.arch.depth=1",
                                       "teacher.arch.channels=[4,8]", "measure.fresh_process=true"])
    student = result["student"]
    assert student["measured_in"] == "fresh_process" and student["fresh_process_max_abs_diff"] == 0.0
    model = load_model_file(student["artifact"])
    assert isinstance(model, DeiT) and model.head_dist.weight.abs().sum() > 0
    assert student["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_deit_loss_sends_labels_to_the_class_head_and_the_teacher_to_the_distillation_head(kind):
    from compresslab.distill.deit import DeiTDistillation

    torch.manual_seed(0)
    student = DeiT((1, 8, 8), 10, depth=1, heads=2, width=16)
    nn.init.normal_(student.heads.head.weight)
    nn.init.normal_(student.head_dist.weight)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    module = DeiTDistillation(student, teacher, 10, kind=kind)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    total, logits, terms = module.distill_terms(x, y)
    z = student.encoder(torch.cat([student.class_token.expand(6, -1, -1), student.dist_token.expand(6, -1, -1),
                                   student._process_input(x)], 1))
    z_cls, z_dist, z_t = student.heads(z[:, 0]), student.head_dist(z[:, 1]), teacher(x)
    ce = nn.functional.cross_entropy(z_cls, y)
    if kind == "hard":
        expected = 0.5 * ce + 0.5 * nn.functional.cross_entropy(z_dist, z_t.argmax(1))
    else:  # (1 - 0.1) CE + 0.1 tau^2 KL(p_t || p_s), tau = 3
        p_t = torch.softmax(z_t / 3, 1)
        kl = (p_t * (p_t.log() - torch.log_softmax(z_dist / 3, 1))).sum(1).mean()
        expected = 0.9 * ce + 0.1 * 9 * kl
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(logits, (z_cls + z_dist) / 2)
    # a student without a distillation token: both terms on its output (class token only)
    vit = ViT((1, 8, 8), 10, depth=1, heads=2, width=16)
    total, logits, _ = DeiTDistillation(vit, teacher, 10, kind="hard").distill_terms(x, y)
    out = vit(x)
    expected = 0.5 * nn.functional.cross_entropy(out, y) + 0.5 * nn.functional.cross_entropy(out, z_t.argmax(1))
    torch.testing.assert_close(total, expected)
    with pytest.raises(ConfigError, match="distill.kind"):
        DeiTDistillation(vit, teacher, 10, kind="medium")


def test_vit_layers_every_method_selects_and_channel_pruning_narrows_only_the_mlps():
    from compresslab.compress.prune.channels import ignored_modules, prune_channels

    torch.manual_seed(0)
    vit = build_model({"_target_": "compresslab.models.ViT", "depth": 2, "width": 16, "heads": 2}, (1, 8, 8), 10)
    names = list(select_layers(vit))
    for i in range(2):
        assert all(f"encoder.layers.encoder_layer_{i}.self_attention.{p}" in names for p in PROJ)
    ignored = {id(m) for m in ignored_modules(vit)}
    block = vit.encoder.layers[0]
    assert all(id(getattr(block.self_attention, p)) in ignored for p in PROJ) and id(block.mlp[0]) not in ignored
    prune_channels(vit, torch.randn(2, 1, 8, 8), 0.5, importance="l1", scope="layer")
    assert block.mlp[0].out_features == 16 and block.mlp[3].in_features == 16  # MLP 32 -> 16
    assert block.self_attention.q_proj.out_features == 16 and vit(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_ort_int8_refuses_a_vit_before_training():
    from compresslab.compress.quant.ort_int8 import OrtInt8

    with pytest.raises(ConfigError, match="ort_int8"):
        OrtInt8("ort_int8").validate_student(ViT((1, 8, 8), 10, depth=1), None)


def test_macs_count_the_attention_products():
    from compresslab.measure.core import count_macs

    model = _Attn()
    model.attn = ExplicitAttention(16, 2, batch_first=True)
    n, tokens, d = 3, 5, 16  # 4 projections + q·kᵀ + attention·v, per sample
    assert count_macs(model, torch.randn(n, tokens, d)) == n * (4 * tokens * d * d + 2 * tokens * tokens * d)
