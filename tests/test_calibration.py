"""compress/calibration.py: Linear input statistics captured with hooks, grouped by shared input,
sequential group by group (shared by the LLM quantization and pruning methods)."""

from __future__ import annotations

import torch
from torch import nn

from compresslab.compress.calibration import capture_stats, input_groups, sequential


def tiny_llama(seed: int = 0, layers: int = 1):
    """A small Llama built from config (random init, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def llama_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def test_groups_follow_the_shared_inputs_of_a_llama_block():
    model = tiny_llama(layers=2)
    groups = input_groups(model, llama_linears(model), torch.randint(0, 40, (2, 8)))
    block = "model.layers.0"
    assert groups[:4] == [[f"{block}.self_attn.{p}_proj" for p in "qkv"], [f"{block}.self_attn.o_proj"],
                          [f"{block}.mlp.gate_proj", f"{block}.mlp.up_proj"], [f"{block}.mlp.down_proj"]]
    assert len(groups) == 8


def test_mlp_layers_are_separate_groups_and_stats_match_the_captured_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    batches = [torch.randn(7, 6), torch.randn(3, 6)]
    assert input_groups(model, ["0", "2", "4"], batches[0]) == [["0"], ["2"], ["4"]]
    stats = capture_stats(model, ["2"], batches)["2"]
    x = torch.cat([torch.relu(model[0](b)) for b in batches]).double()
    assert stats.count == 10
    torch.testing.assert_close(stats.xtx, x.T @ x)
    torch.testing.assert_close(stats.abs_mean, x.abs().mean(0))
    torch.testing.assert_close(stats.abs_max, x.abs().amax(0))
    torch.testing.assert_close(stats.hessian, 2 * x.T @ x / 10)


def test_sequential_captures_each_group_after_the_earlier_ones_were_transformed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    batches = [torch.randn(5, 4)]
    seen = {}

    def transform(group, stats):
        seen[group[0]] = stats[group[0]].xtx.clone()
        for name in group:
            model.get_submodule(name).weight.data.zero_()
            model.get_submodule(name).bias.data.fill_(1.0)

    assert sequential(model, ["0", "1"], batches, transform) == [["0"], ["1"]]
    # layer 1 saw the output of the already transformed layer 0: all ones
    torch.testing.assert_close(seen["1"], torch.full((4, 4), 5.0, dtype=torch.float64))
