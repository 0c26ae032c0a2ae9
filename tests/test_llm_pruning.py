"""``prune=wanda``, ``prune=sparsegpt`` and the one-shot ``prune=magnitude prune.at=null`` baseline
(issue #27): each algorithm against an independent computation of its formula, N:M exactness on a
tiny Llama and on the saved artifact reloaded in a fresh process, and the bad options refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compresslab.compress import build_methods
from compresslab.compress.prune.oneshot import output_rel_error
from compresslab.compress.prune.sparsegpt import sparsegpt_prune
from compresslab.compress.prune.wanda import wanda_mask
from compresslab.errors import ConfigError


def correlated_inputs(tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features of unequal scales (as an LM's hidden states)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.logspace(0, -1.5, dim).unsqueeze(1)
    scale = torch.logspace(-1, 1, dim)[torch.randperm(dim, generator=g)]
    return (torch.randn(tokens, dim, generator=g) @ mix) * scale


def test_wanda_mask_is_the_brute_force_score_ranking():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(5, 12, generator=g), torch.randn(40, 12, generator=g) * torch.arange(1, 13)
    keep = wanda_mask(w, x, 0.5)
    keep_nm = wanda_mask(w, x, 0.5, n=1, m=4)
    for i in range(5):
        score = [abs(float(w[i, j])) * sum(float(x[t, j]) ** 2 for t in range(40)) ** 0.5 for j in range(12)]
        lowest = sorted(range(12), key=lambda j: score[j])[:6]
        assert {j for j in range(12) if not keep[i, j]} == set(lowest)
        for g0 in range(0, 12, 4):
            best = max(range(g0, g0 + 4), key=lambda j: score[j])
            assert [j for j in range(g0, g0 + 4) if keep_nm[i, j]] == [best]


def sequential_least_squares(w: torch.Tensor, x: torch.Tensor, pruned: torch.Tensor, damp: float) -> torch.Tensor:
    """SparseGPT's reconstruction computed independently: per row, columns fixed left to right (zero
    where pruned), and after each the still-free columns re-solved exactly by least squares on
    ``‖X(w'−w)‖² + λ‖w'−w‖²`` (``np.linalg.lstsq``-style solve on the stacked system, no OBS formula)."""
    x, w = x.double(), w.double()
    cols = w.shape[1]
    lam = damp * float(torch.diag(x.T @ x).mean())
    a = torch.cat([x, lam ** 0.5 * torch.eye(cols, dtype=x.dtype)])
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        target = a @ w[r]
        cur = w[r].clone()
        for j in range(cols):
            if pruned[r, j]:
                cur[j] = 0.0
            free = list(range(j + 1, cols))
            if free:
                rest = target - a[:, : j + 1] @ cur[: j + 1]
                cur[free] = torch.linalg.lstsq(a[:, free], rest.unsqueeze(1)).solution.squeeze(1)
        out[r] = cur
    return out


def test_sparsegpt_reconstruction_is_sequential_least_squares_across_lazy_blocks():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(4, 10, generator=g), correlated_inputs(64, 10)
    pruned = torch.rand(4, 10, generator=g) < 0.5
    ours = sparsegpt_prune(w, x.T @ x, 0.5, blocksize=4, percdamp=0.01, prune_mask=pruned)
    ref = sequential_least_squares(w, x, pruned, 0.01)
    assert torch.allclose(ours.double(), ref, atol=1e-5), (ours.double() - ref).abs().max()
    assert bool((ours[pruned] == 0).all()) and bool((ours[~pruned] != 0).all())


def test_sparsegpt_equals_the_exact_least_squares_solution_when_pruned_weights_come_first():
    """With each row's pruned weights before its kept ones, the kept weights are re-solved after
    the last pruning: the exact solution of min ‖XW'ᵀ − XWᵀ‖ over the kept weights (percdamp → 0)."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(3, 8, generator=g), correlated_inputs(80, 8, seed=3)
    pruned = torch.zeros(3, 8, dtype=torch.bool)
    for r, k in enumerate((2, 4, 5)):
        pruned[r, :k] = True
    ours = sparsegpt_prune(w, x.T @ x, 0.5, blocksize=3, percdamp=1e-10, prune_mask=pruned).double()
    xd = x.double()
    for r in range(3):
        kept = (~pruned[r]).nonzero().squeeze(1)
        exact = torch.linalg.lstsq(xd[:, kept], (xd @ w[r].double()).unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(ours[r, kept], exact, rtol=1e-5, atol=1e-5)  # float32 weights
        assert bool((ours[r, pruned[r]] == 0).all())


@pytest.mark.parametrize("n, m", [(None, None), (2, 4)])
def test_sparsegpt_layer_error_is_at_most_wanda_and_magnitude_on_correlated_inputs(n, m):
    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(32, 64, generator=g), correlated_inputs(512, 64, seed=4)
    errors = {}
    magnitude = wanda_mask(w, torch.ones(1, 64), 0.5, n, m)  # |W| alone: the magnitude ranking per row
    for name, new in {"magnitude": w * magnitude, "wanda": w * wanda_mask(w, x, 0.5, n, m),
                      "sparsegpt": sparsegpt_prune(w, x.T @ x, 0.5, n, m, blocksize=16)}.items():
        assert abs(float((new == 0).float().mean()) - 0.5) < 1e-6
        errors[name] = float((x @ (new - w).T).pow(2).sum())
    assert errors["sparsegpt"] <= errors["wanda"] and errors["sparsegpt"] <= errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


class _Calibration:
    """The datamodule surface the methods read: a train loader of (tokens, targets) batches."""

    def __init__(self, batches):
        self.batches = batches

    def train_dataloader(self):
        return list(self.batches)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_one_shot_methods_on_a_tiny_llama_prune_its_linears_at_2_4(make_cfg, method):
    model = tiny_llama()
    tokens = torch.randint(0, 48, (4, 16), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = ["prune.at=null"] if method == "magnitude" else ["prune.num_calibration_batches=2"]
    (pruner,) = build_methods(make_cfg([f"prune={method}", "prune.n=2", "prune.m=4", *extra]))
    pruner.prune_after_training(model, _Calibration([(tokens[:2], None), (tokens[2:], None)]))
    layers = pruner.prunable(model)
    assert len(layers) == 14 and "lm_head" not in layers  # 7 Linears per block; embeddings/lm_head left dense
    for name, layer in layers.items():
        groups = layer.weight.reshape(layer.weight.shape[0], -1, 4)
        assert bool(((groups != 0).sum(-1) == 2).all()), name
    state = model.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(state[key], before[key])
    if method != "magnitude":
        rep = pruner.report()
        assert rep["calibration_tokens"] == 64 and set(rep["layer_output_rel_error"]) == set(layers)
        assert all(0 < e < 1 for e in rep["layer_output_rel_error"].values())


def test_output_error_figure_is_the_direct_computation():
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(6, 8, generator=g), torch.randn(30, 8, generator=g)
    new = w * wanda_mask(w, x, 0.5)
    direct = float((x @ (new - w).T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert output_rel_error(w, new, x.double().T @ x.double()) == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("overrides, key", [
    (["prune=wanda", "prune.n=4", "prune.m=4"], "prune.n"),
    (["prune=sparsegpt", "prune.n=2"], "prune.m"),
    (["prune=sparsegpt", "prune.final_sparsity=1.2"], "prune.final_sparsity"),
    (["prune=wanda", "prune.final_sparsity=-0.1"], "prune.final_sparsity"),
    (["prune=magnitude", "prune.n=2", "prune.m=4"], "prune.at"),
    (["prune=sparsegpt", "prune.n=2", "prune.m=8", "prune.blocksize=12"], "prune.blocksize"),
])
def test_bad_options_name_the_key(make_cfg, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_methods(make_cfg(overrides))


def test_wanda_on_an_image_mlp_prunes_every_hidden_linear_per_row(make_cfg):
    from compresslab.models import MLP

    torch.manual_seed(0)
    mlp = MLP(input_shape=[64], num_classes=10, hidden=[32, 16])
    (pruner,) = build_methods(make_cfg(["prune=wanda", "prune.final_sparsity=0.75", "prune.num_calibration_batches=1"]))
    pruner.prune_after_training(mlp, _Calibration([(torch.randn(50, 64), None)]))
    layers = pruner.prunable(mlp)
    assert len(layers) == 2  # the classifier stays dense
    for layer in layers.values():  # per output row: exactly int(0.75 * in) zeros
        assert bool(((layer.weight == 0).sum(1) == int(0.75 * layer.in_features)).all())


_COUNT = """
import sys, torch
from compresslab.artifact import load_model_file, read_payload
p = read_payload(sys.argv[1]); model = load_model_file(sys.argv[1])
ws = [mod.weight.reshape(mod.weight.shape[0], -1, 4) for n, mod in model.named_modules() if n in p["nm"]]
print(p["format"], len(ws), all(bool(((w != 0).sum(-1) == 2).all()) for w in ws))
"""


@pytest.mark.slow
def test_sparsegpt_2_4_on_llama_tiny_end_to_end_artifact_has_exactly_2_of_4_in_a_fresh_process(make_cfg):
    from compresslab.pipeline import run_experiment

    cfg = make_cfg(["dataset=shakespeare", "student=llama_tiny", "teacher=none", "prune=sparsegpt", "prune.n=2",
                    "prune.m=4", "prune.num_calibration_batches=2"])
    record = run_experiment(cfg)
    run_dir = Path(cfg.paths.run_dir)
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["status"] == record["status"] == "completed"
    student, rep = saved["student"], saved["student"]["prune"]
    assert rep["pattern"] == "2:4" and rep["nm_pattern_ok"] and len(rep["nm_layers"]) == 14  # 7 Linears x 2 blocks
    assert not any("lm_head" in n or "embed" in n for n in rep["nm_layers"])
    assert rep["sparsity_prunable"] == pytest.approx(0.5) and rep["schedule_done"]
    assert set(rep["layer_output_rel_error"]) == set(rep["nm_layers"]) and rep["calibration_batches"] == 2
    assert student["encodings"]["format"] == "compresslab.nm/1" and student["perplexity"] > 1
    out = subprocess.run([sys.executable, "-c", _COUNT, str(run_dir / "artifacts" / "student.pt")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[-3:] == ["compresslab.nm/1", "14", "True"]


def test_showcase_lm_grid_composes_and_builds_every_cell(make_cfg):
    """``experiment=showcase_lm``: quant × prune on llama_tiny, table rows/cols/metrics for the report
    (the sweep itself is run by hand: minutes; see docs/pruning.md)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra_cfg = compose("config", overrides=["experiment=showcase_lm"], return_hydra_config=True).hydra
    params = OmegaConf.to_container(hydra_cfg.sweeper.params)
    assert hydra_cfg.callbacks.sweep_summary.report.metrics[0] == "perplexity"
    for quant in params["quant"].split(","):
        for prune in params["prune"].split(","):
            cfg = make_cfg(["experiment=showcase_lm", f"quant={quant}", f"prune={prune}"])
            assert cfg.dataset.name == "shakespeare" and cfg.student.name == "llama_tiny"
            assert [m.name for m in build_methods(cfg)] == [n for n in (prune, quant) if n != "none"]
