"""Method catalogue (pruning / quantization / low rank): each method against an independent
computation of its paper's formula on small tensors, artifacts that reload exactly, config checks
that fail before training, and end-to-end runs through the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compresslab.artifact import load_model_file
from compresslab.compress.quant.lsq_pact import ActQuant
from compresslab.compress.quant.bit_allocation import allocate_bits
from compresslab.compress.lowrank.factorized import apply_plan, lowrank_plan
from compresslab.compress.prune import NetworkSlimming, StructuredPruning, prune_channels
from compresslab.compress.prune.channels import GroupNormRegularizer
from compresslab.compress.prune.slimming import L1BNPenalty, slim_channels
from compresslab.compress.quant.quantizers import dorefa_codes, dorefa_quantize, lsq_init_step, lsq_quantize, pact_quantize
from compresslab.compress.lowrank.tensor_decomp import (
    cp_factorize,
    energy_rank,
    evbmf_rank,
    tucker2_factorize,
    unfold,
)
from compresslab.compress.lowrank.tucker_cp import TensorLowRank
from compresslab.errors import ConfigError
from compresslab.files import atomic_torch_save

ROOT = Path(__file__).resolve().parents[1]


class TwoConv(nn.Module):
    """conv1(2->6) - bn1 - relu - conv2(6->4) - bn2 - relu - pool - fc(4->3): two channel groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def _net(seed=0):
    torch.manual_seed(seed)
    net = TwoConv()
    with torch.no_grad():  # distinct BN scales so every ranking is strict
        net.bn1.weight.copy_(torch.rand(6) + 0.1)
        net.bn2.weight.copy_(torch.rand(4) + 0.1)
    return net.eval()


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Indices of ``before``'s rows that survive in ``after`` (matched by value)."""
    return [i for i in range(before.shape[0]) if any(torch.equal(before[i], r) for r in after)]


def _lowest(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(scores)[:k].tolist())


X = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


# ---------------------------------------------------------------- structured importances
@pytest.mark.parametrize("p", [1, 2])
def test_l1_l2_remove_the_filters_with_the_smallest_own_norm(p):
    """Li et al. 2017: rank conv1's filters by sum |W[c]|^p of that layer alone."""
    net = _net()
    w1 = net.conv1.weight.detach().clone()
    score = w1.abs().pow(p).flatten(1).sum(1)
    prune_channels(net, X[:1], 0.5, f"l{p}")
    removed = set(range(6)) - set(_kept_rows(w1, net.conv1.weight.detach()))
    assert removed == _lowest(score, 3)
    assert net.conv2.in_channels == 3 and net(X).shape == (8, 3)


def test_hessian_importance_is_obd_saliency_with_the_empirical_fisher():
    """OBD: Σ_w ½ h w² per channel, h ≈ mean_n (∂L_n/∂w)² (per sample), averaged over conv1's
    out-rows, bn1's γ and conv2's in-columns (the coupled group)."""
    net = _net()
    params = {"c1": net.conv1.weight, "g1": net.bn1.weight, "c2": net.conv2.weight}
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(X.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(net(X[i:i + 1]), Y[i:i + 1]), list(params.values()))
        for k, g in zip(params, grads):
            fisher[k] += g ** 2 / X.shape[0]
    w = {k: v.detach() for k, v in params.items()}
    score = ((w["c1"] ** 2 * fisher["c1"]).flatten(1).sum(1) + w["g1"] ** 2 * fisher["g1"]
             + (w["c2"] ** 2 * fisher["c2"]).transpose(0, 1).flatten(1).sum(1)) / 3
    w1 = w["c1"].clone()
    prune_channels(net, X[:1], 0.5, "hessian", batches=[(X, Y)])
    removed = set(range(6)) - set(_kept_rows(w1, net.conv1.weight.detach()))
    assert removed == _lowest(score, 3)


def _group_sq_norms(net) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the mean over the coupled tensors of their squared norms (conv1 group, conv2 group)."""
    c1, g1, c2, g2, fc = (t.detach() for t in (net.conv1.weight, net.bn1.weight, net.conv2.weight,
                                               net.bn2.weight, net.fc.weight))
    s1 = (c1.pow(2).flatten(1).sum(1) + g1 ** 2 + c2.pow(2).transpose(0, 1).flatten(1).sum(1)) / 3
    s2 = (c2.pow(2).flatten(1).sum(1) + g2 ** 2 + fc.pow(2).sum(0)) / 3
    return s1, s2


def test_lamp_scores_rank_channels_globally():
    """LAMP (Lee et al. 2021): score(u) = W[u]² / Σ_{v ≥ u} W[v]² over each layer's channels sorted by
    squared norm; one global ranking removes the lowest scores across layers."""
    net = _net()
    s1, s2 = _group_sq_norms(net)

    def lamp(s):
        order = torch.argsort(s)
        sorted_s = s[order]
        tail = torch.flip(torch.cumsum(torch.flip(sorted_s, [0]), 0), [0])  # Σ_{v >= u}
        out = torch.empty_like(s)
        out[order] = sorted_s / tail
        return out

    scores = torch.cat([lamp(s1), lamp(s2)])
    n_removed = 10 - int(10 * (1 - 0.4))
    threshold = torch.sort(scores).values[n_removed - 1]
    w1, w2 = net.conv1.weight.detach().clone(), net.conv2.weight.detach().clone()
    prune_channels(net, X[:1], 0.4, "lamp", scope="global", max_layer_ratio=1.0)
    assert set(range(6)) - set(_kept_rows(w1, net.conv1.weight.detach())) == set(
        torch.nonzero(lamp(s1) <= threshold).view(-1).tolist())
    kept2 = [i for i in range(4) if any(torch.equal(w2[i, :, :, :][_kept_rows(w1, net.conv1.weight.detach())], r)
                                        for r in net.conv2.weight.detach())]
    assert set(range(4)) - set(kept2) == set(torch.nonzero(lamp(s2) <= threshold).view(-1).tolist())
    with pytest.raises(ConfigError, match="scope=global"):
        StructuredPruning("structured", importance="lamp", scope="layer")


def test_group_norm_regularizer_is_depgraph_gradient():
    """DepGraph sparse training: grad += reg · γ_k · w on every coupled weight, with
    γ_k = 2^(α (I_max − I_k)/(I_max − I_min)), I_k = sqrt(group norm / its mean)."""
    net = _net()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    reg, alpha = 1e-3, 4.0
    GroupNormRegularizer(net, X[:1], reg, alpha)()
    s1, _ = _group_sq_norms(net)
    imp = (s1 / s1.mean()).sqrt()
    gamma = 2 ** (alpha * (imp.max() - imp) / (imp.max() - imp.min()))
    torch.testing.assert_close(net.conv1.weight.grad, reg * gamma.view(-1, 1, 1, 1) * net.conv1.weight.detach())
    torch.testing.assert_close(net.bn1.weight.grad, reg * gamma * net.bn1.weight.detach())
    # and the importance it prunes with is the same group norm (mean over the coupled tensors)
    w1 = net.conv1.weight.detach().clone()
    prune_channels(net, X[:1], 0.5, "group_norm")
    assert set(range(6)) - set(_kept_rows(w1, net.conv1.weight.detach())) == _lowest(s1, 3)


# ---------------------------------------------------------------- network slimming
def test_slimming_penalty_and_global_threshold():
    """Liu et al. 2017: ∂/∂γ of λΣ|γ| is λ·sign(γ); one global |γ| threshold over both layers
    removes the `ratio` smallest scaling factors, so the layers lose different fractions."""
    net = _net()
    with torch.no_grad():
        net.bn1.weight.copy_(torch.tensor([0.9, -0.05, 0.8, 0.02, 0.7, 0.6]))
        net.bn2.weight.copy_(torch.tensor([0.03, 0.5, -0.04, 0.4]))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    L1BNPenalty(net, 1e-2)()
    torch.testing.assert_close(net.bn1.weight.grad, 1e-2 * torch.sign(net.bn1.weight.detach()))
    gammas = torch.cat([net.bn1.weight.detach().abs(), net.bn2.weight.detach().abs()])
    removed = _lowest(gammas, 4)  # 40% of the 10 channels: bn1[1], bn1[3], bn2[0], bn2[2]
    assert removed == {1, 3, 6, 8}
    slim_channels(net, X[:1], 0.4, max_layer_ratio=0.9)
    torch.testing.assert_close(net.bn1.weight.detach(), torch.tensor([0.9, 0.8, 0.7, 0.6]))
    torch.testing.assert_close(net.bn2.weight.detach(), torch.tensor([0.5, 0.4]))
    assert net.conv2.in_channels == 4 and net.fc.in_features == 2 and net(X).shape == (8, 3)


def test_slimming_needs_batchnorm_and_fails_in_validation(make_cfg):
    from compresslab.pipeline import build_datamodule, validate

    cfg = make_cfg(["teacher=none", "student=lenet5", "prune=slimming", "prune.start=0"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="BatchNorm"):
        validate(cfg, dm)
    with pytest.raises(ConfigError, match="strength"):
        NetworkSlimming("slimming", strength=-1.0, start=1)


# ---------------------------------------------------------------- LSQ / PACT
@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (3, True)])
def test_lsq_forward_and_step_gradient_match_the_paper(bits, signed):
    """Esser et al. 2020, Eq. 1-3: v̂ = round(clip(v/s, −Q_N, Q_P))·s; ∂v̂/∂s = −v/s + round(v/s)
    inside, −Q_N / Q_P at the clips, times g = 1/sqrt(N Q_P); ∂v̂/∂v = 1 inside, 0 outside."""
    torch.manual_seed(bits)
    v = (torch.randn(50) * 2).requires_grad_()
    s = torch.tensor(0.3, requires_grad=True)
    c = torch.randn(50)
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    out = lsq_quantize(v, s, bits, signed, n=v.numel())
    (out * c).sum().backward()
    vs = v.detach().numpy() / 0.3
    expected = np.round(np.clip(vs, -qn, qp)) * 0.3
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=0, atol=1e-6)
    inside = (vs > -qn) & (vs < qp)
    ds = np.where(inside, -vs + np.round(vs), np.where(vs <= -qn, -qn, qp))
    g = 1 / math.sqrt(v.numel() * qp)
    np.testing.assert_allclose(float(s.grad), float((c.numpy() * ds).sum() * g), rtol=1e-4)
    np.testing.assert_allclose(v.grad.numpy(), c.numpy() * inside, rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(lsq_init_step(v, bits, signed)), 2 * np.abs(v.detach().numpy()).mean() / math.sqrt(qp),
                               rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_pact_clip_quantize_and_alpha_gradient_match_the_paper(bits):
    """Choi et al. 2018, Eq. 1-3: y = clip(x, 0, α), y_q = round(y (2^b−1)/α) α/(2^b−1);
    ∂y_q/∂α = 1 where x ≥ α, else 0; ∂y_q/∂x = 1 on [0, α)."""
    x = (torch.linspace(-2, 6, 41) + 0.013).requires_grad_()  # no point exactly at 0 or α (kinks)
    alpha = torch.tensor(3.0, requires_grad=True)
    c = torch.randn(41, generator=torch.Generator().manual_seed(0))
    out = pact_quantize(x, alpha, bits, signed=False)
    (out * c).sum().backward()
    xn = x.detach().numpy()
    n = 2 ** bits - 1
    np.testing.assert_allclose(out.detach().numpy(), np.round(np.clip(xn, 0, 3) * n / 3) * 3 / n, atol=1e-6)
    np.testing.assert_allclose(float(alpha.grad), float(c.numpy()[xn >= 3].sum()), rtol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), c.numpy() * ((xn > 0) & (xn < 3)), atol=1e-6)


def test_dorefa_weights_as_pact_uses_them():
    """Zhou et al. 2016: w_q = 2 quantize_b(tanh w / (2 max|tanh w|) + ½) − 1."""
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    t = np.tanh(w.numpy())
    for bits in (2, 4):
        n = 2 ** bits - 1
        expected = 2 * np.round((t / (2 * np.abs(t).max()) + 0.5) * n) / n - 1
        np.testing.assert_allclose(dorefa_quantize(w, bits).numpy(), expected, atol=1e-6)
        assert int(dorefa_codes(w, bits).max()) <= n and len(np.unique(expected)) <= 2 ** bits


def test_sensitivity_allocation_keeps_bits_on_sensitive_layers_under_the_budget():
    delta = {"a": {2: 5.0, 4: 0.5, 8: 0.0}, "b": {2: 0.1, 4: 0.01, 8: 0.0}, "c": {2: 0.2, 4: 0.02, 8: 0.0}}
    sizes = {"a": 100, "b": 100, "c": 100}
    bits = allocate_bits(delta, sizes, [2, 4, 8], budget_bits=4.0)
    assert sum(bits[n] * sizes[n] for n in bits) / 300 <= 4.0
    assert bits["a"] == max(bits.values()) and bits["a"] > bits["b"]


@pytest.mark.parametrize("scheme", ["lsq", "pact"])
def test_actquant_artifact_is_bitpacked_and_reloads_exactly(scheme, tmp_path):
    from compresslab.models import build_model

    spec = {"_target_": "compresslab.models.LeNet5"}
    torch.manual_seed(0)
    model = build_model(spec, (1, 8, 8), 10)
    method = ActQuant(scheme, scheme=scheme, weight_bits=2, act_bits=3,
                      first_last_bits=8 if scheme == "lsq" else None, bits_per_layer={"classifier.2": [4, 8]})
    model = method.prepare(model, None)
    x = torch.randn(16, 1, 8, 8)
    model.train()
    model(x)  # first batch initialises the quantizers
    model.eval()
    y = model(x).detach()
    payload = method.export(model, {"arch": spec, "input_shape": [1, 8, 8], "num_classes": 10})
    atomic_torch_save(payload, tmp_path / "s.pt")
    reloaded = load_model_file(tmp_path / "s.pt")
    torch.testing.assert_close(reloaded(x), y, rtol=0, atol=0)
    layers = {entry["name"]: entry for entry in payload["layers"]}
    assert layers["classifier.2"]["w_bits"] == 4 and layers["classifier.2"]["act"]["bits"] == 8
    inner = [n for n, e in layers.items() if e["w_bits"] == 2]
    assert inner and all(layers[n]["nbytes"] == math.ceil(math.prod(layers[n]["shape"]) * 2 / 8) for n in inner)
    edge = layers["features.0"]
    assert edge["w_bits"] == (8 if scheme == "lsq" else 32)


def test_actquant_config_errors():
    with pytest.raises(ConfigError, match="alpha"):
        ActQuant("lsq", scheme="lsq", alpha_init=5.0)
    with pytest.raises(ConfigError, match="start_epoch"):
        ActQuant("lsq", scheme="lsq", bits_per_layer="sensitivity")
    with pytest.raises(ConfigError, match="bits"):
        ActQuant("lsq", scheme="lsq", weight_bits=9)
    from compresslab.models import build_model

    with pytest.raises(ConfigError, match="not quantizable layers"):
        ActQuant("lsq", bits_per_layer={"nope": 4}).validate_student(
            build_model({"_target_": "compresslab.models.LeNet5"}, (1, 8, 8), 10), None)


# ---------------------------------------------------------------- Tucker-2 / CP
def test_tucker2_layers_compute_the_papers_kernel_and_full_rank_is_exact():
    """Kim et al. 2016, Eq. 4-6: K[t,s,j,i] = Σ_ab C[a,b,j,i] U[t,a] V[s,b], as 1x1 -> kxk -> 1x1."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 6, 7, 7)
    fact = tucker2_factorize(conv, 5, 4)
    v = fact.first.weight.detach()[:, :, 0, 0].T      # S x R_in
    u = fact.last.weight.detach()[:, :, 0, 0]         # T x R_out
    kernel = torch.einsum("abji,ta,sb->tsji", fact.core.weight.detach(), u, v)
    torch.testing.assert_close(fact(x), F.conv2d(x, kernel, fact.last.bias, stride=2, padding=1), atol=1e-5, rtol=1e-5)
    # the factors are tensorly's HOOI: they beat the truncated HOSVD's error and are orthonormal
    torch.testing.assert_close(u.T @ u, torch.eye(5), atol=1e-5, rtol=0)
    w = conv.weight.detach().double()
    u0 = torch.linalg.svd(unfold(w, 0), full_matrices=False)[0][:, :5]
    v0 = torch.linalg.svd(unfold(w, 1), full_matrices=False)[0][:, :4]
    hosvd = torch.einsum("tsji,ta,sb,ca,db->cdji", w, u0, v0, u0, v0)  # W x0 U0 U0^T x1 V0 V0^T
    assert (kernel.double() - w).norm() <= (hosvd - w).norm() + 1e-6
    full = tucker2_factorize(conv, 8, 6)
    torch.testing.assert_close(full(x), conv(x), atol=1e-5, rtol=1e-5)


def test_cp_layers_compute_the_papers_kernel():
    """Lebedev et al. 2015, Eq. 2-6: K[t,s,j,i] = Σ_r A_t[t,r] A_s[s,r] A_y[j,r] A_x[i,r], as
    1x1 -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    fact = cp_factorize(conv, 6)
    a_s = fact.pw_in.weight.detach()[:, :, 0, 0].T
    a_y = fact.dw_v.weight.detach()[:, 0, :, 0].T
    a_x = fact.dw_h.weight.detach()[:, 0, 0, :].T
    a_t = fact.pw_out.weight.detach()[:, :, 0, 0]
    kernel = torch.einsum("tr,sr,jr,ir->tsji", a_t, a_s, a_y, a_x)
    torch.testing.assert_close(fact(x), F.conv2d(x, kernel, fact.pw_out.bias, padding=1), atol=1e-5, rtol=1e-5)
    # a rank above the kernel's generic CP rank reconstructs it closely
    close = cp_factorize(conv, 40)
    assert float((close(x) - conv(x)).norm() / conv(x).norm()) < 1e-2


def test_vbmf_and_energy_ranks():
    """EVBMF (Nakajima et al. 2013) finds the rank of a low-rank matrix under noise, 0 for pure noise."""
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((30, 4)) @ rng.standard_normal((4, 50))
    assert evbmf_rank(signal + 0.05 * rng.standard_normal((30, 50))) == 4
    assert evbmf_rank(rng.standard_normal((30, 50))) == 0
    m = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5]))
    assert energy_rank(m, 0.9) == 2 and energy_rank(m, 0.99) == 4  # 9+4 = 13/14.25 = 0.91


def test_tensor_lowrank_plan_rebuilds_and_config_errors():
    from compresslab.models import build_model

    spec = {"_target_": "compresslab.models.CifarResNet", "depth": 8}
    torch.manual_seed(0)
    model = build_model(spec, (1, 8, 8), 10).eval()
    method = TensorLowRank("tucker", decomposition="tucker2", rank_mode="ratio", rank_ratio=0.5,
                           ranks={"layer1.0.conv1": [3, 2]})
    method.decompose(model)
    assert model.layer1[0].conv1.rank == [3, 2]
    plan = lowrank_plan(model)
    rebuilt = apply_plan(build_model(spec, (1, 8, 8), 10), plan).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), model(x))
    with pytest.raises(ConfigError, match="rank_mode=energy"):
        TensorLowRank("tucker", rank_mode="vbmf", energy=0.9)
    with pytest.raises(ConfigError, match="rank_mode"):
        TensorLowRank("cp", decomposition="cp", rank_mode="energy", energy=0.9)
    with pytest.raises(ConfigError, match="not decomposable"):
        TensorLowRank("tucker", ranks={"fc": [1, 1]}).validate_student(build_model(spec, (1, 8, 8), 10), None)


# ---------------------------------------------------------------- through the CLI
CLI_FAST = ["teacher=none", "logger=none", "student.epochs=2", "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "measure.latency_warmup=1", "measure.latency_round_ms=1", "measure.latency_rounds=2",
            "measure.latency_batch=8", "measure.fresh_process=false"]


@pytest.mark.slow
@pytest.mark.parametrize("name,overrides", [
    ("importances", ["student=resnet8", "prune=structured", "prune.scope=global", "prune.start=1",
                     "prune.taylor_batches=1", "prune.importance=hessian,lamp,group_norm"]),  # the new ones
    ("slimming", ["student=resnet8", "prune=slimming", "prune.start=1"]),
    ("act_quant", ["student=lenet5", "quant=lsq,pact"]),  # (W2A2 artifacts: test_actquant_artifact_...)
    # start_epoch -8 of 2 epochs: decomposed at epoch 0; few ALS/HOOI iterations to keep it short
    ("tucker", ["student=resnet8", "lowrank=tucker", "lowrank.n_iter_max=5"]),
    ("cp", ["student=resnet8", "lowrank=cp", "lowrank.n_iter_max=5"]),
])
def test_cli_end_to_end(name, overrides, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "COMPRESSLAB_TEACHER_CACHE": str(tmp_path / "teachers")}
    cmd = [sys.executable, "-m", "compresslab.cli", "-m", *CLI_FAST, *overrides,
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.data_dir={tmp_path / 'data'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").rglob("results.json"))]
    expected = {"importances": 3, "slimming": 1, "act_quant": 2, "tucker": 1, "cp": 1}[name]
    assert len(records) == expected and all(r["status"] == "completed" for r in records)
    for r in records:
        st, ref = r["student"], r["reference"]
        if name in ("importances", "slimming"):
            assert st["params"] < ref["params"] and st["size_bytes"] < ref["size_bytes"]  # physically smaller
        elif name == "act_quant":
            assert st["size_ratio"] > 4 and st["acc_top1"] is not None
        else:
            assert st["params"] < ref["params"] and st["macs"] < ref["macs"] and st["latency_ms_b1"] > 0
