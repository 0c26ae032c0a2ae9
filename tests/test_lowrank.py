"""Truncated-SVD low-rank factorization: exactness at full rank, parameter/MAC counts at reduced
rank, rank selection, deferred factorization, and the artifact with its factorization plan."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresslab.artifact import atomic_torch_save, load_model_file
from compresslab.compress.lowrank.factorized import lowrank_plan
from compresslab.compress.lowrank.svd import (
    DeferredLowRank,
    SVDLowRank,
    choose_rank,
    factorize,
    full_rank,
)
from compresslab.measure.core import count_macs, count_params
from compresslab.models import build_model
from compresslab.pipeline import run_experiment

SHAPE = (1, 8, 8)


def _cases():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return [
        (nn.Linear(40, 24), "linear", torch.randn(5, 40, generator=g)),
        (nn.Conv2d(6, 10, 3, stride=2, padding=1), "conv_channel", torch.randn(2, 6, 9, 9, generator=g)),
        (nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False), "conv_spatial",
         torch.randn(2, 6, 11, 12, generator=g)),
        (nn.Conv1d(4, 8, 5, padding=2), "conv_channel", torch.randn(3, 4, 20, generator=g)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_full_rank_factorization_reproduces_the_layer(case):
    layer, kind, x = _cases()[case]
    new = factorize(layer, kind, full_rank(layer, kind))
    with torch.no_grad():
        ref, out = layer(x), new(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def _expected_params_and_macs(layer, kind, rank, x):
    """Independent counts from the layer geometry."""
    w = layer.weight
    bias = w.shape[0] if layer.bias is not None else 0
    with torch.no_grad():
        out = layer(x)
    positions = out[0, 0].numel() if out.dim() > 2 else 1
    if kind == "linear":
        return rank * (w.shape[1] + w.shape[0]) + bias, rank * (w.shape[1] + w.shape[0])
    if kind == "conv_channel":
        k = w[0].numel()
        return rank * (k + w.shape[0]) + bias, positions * rank * (k + w.shape[0])
    out_c, in_c, kh, kw = w.shape
    mid = nn.functional.conv2d(x, torch.zeros(rank, in_c, kh, 1), stride=(layer.stride[0], 1),
                               padding=(layer.padding[0], 0), dilation=(layer.dilation[0], 1))
    return rank * (in_c * kh + out_c * kw) + bias, mid[0, 0].numel() * rank * in_c * kh + positions * out_c * rank * kw


@pytest.mark.parametrize("case", range(4))
def test_reduced_rank_params_and_macs_drop_as_computed(case):
    layer, kind, x = _cases()[case]
    rank = 3
    new = factorize(layer, kind, rank)
    params, macs = _expected_params_and_macs(layer, kind, rank, x)
    assert count_params(new)["params"] == params
    assert count_macs(new, x[:1]) == macs
    assert params < count_params(layer)["params"] and macs < count_macs(layer, x[:1])
    # a truncated SVD is the best rank-r approximation: error = the dropped singular values
    mat = layer.weight.detach().reshape(layer.weight.shape[0], -1) if kind != "conv_spatial" else None
    if mat is not None:
        s = torch.linalg.svdvals(mat)
        approx = (new.second.weight.reshape(mat.shape[0], -1) @ new.first.weight.reshape(rank, -1)).detach()
        assert float(torch.linalg.matrix_norm(mat - approx)) == pytest.approx(float(s[rank:].square().sum().sqrt()),
                                                                       rel=1e-3)


def test_rank_by_ratio_and_by_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, 4, None, 16 / 22) == 1
    assert choose_rank(s, 4, None, 0.9) == 2  # 20/22 = 0.909
    assert choose_rank(s, 4, None, 1.0) == 4
    assert choose_rank(s, 4, 0.5, None) == 2 and choose_rank(s, 4, 0.01, None) == 1


def test_deferred_factorization_switches_and_compacts_exactly():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    wrapped = DeferredLowRank(layer, "conv_channel")
    with torch.no_grad():
        assert torch.equal(wrapped(x), layer(x))  # dense until switched
        wrapped.switch(5)
        masked = wrapped(x)
        compact = wrapped.compact()
        assert compact.rank == 5 and torch.allclose(compact(x), masked, atol=1e-5)
        assert torch.allclose(compact(x), factorize(layer, "conv_channel", 5)(x), atol=1e-5)
    assert not layer.weight.requires_grad


def test_lowrank_artifact_rebuilds_the_factorized_model(tmp_path):
    torch.manual_seed(0)
    arch = {"_target_": "compresslab.models.CifarResNet", "depth": 8}
    method = SVDLowRank("svd", rank_ratio=None, energy=0.8, when="before", conv_mode="spatial")
    model = method.prepare(build_model(arch, SHAPE, 10), None).eval()
    plan = lowrank_plan(model)
    report = method.report()
    assert plan and set(report["ranks"]) == set(plan)
    assert all(plan[n]["rank"] == r for n, r in report["ranks"].items())
    assert all(e >= 0.8 for e in report["energy_kept"].values())
    assert report["layer_params_after"] < report["layer_params_before"]
    payload = method.export(model, {"arch": arch, "input_shape": list(SHAPE), "num_classes": 10})
    atomic_torch_save(payload, tmp_path / "lr.pt")
    loaded = load_model_file(tmp_path / "lr.pt")
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert count_params(loaded)["params"] == count_params(model)["params"]


def test_svd_after_training_pipeline_reports_ranks_and_finetunes(make_cfg):
    record = run_experiment(make_cfg(["lowrank=svd", "lowrank.when=after", "teacher=none", "student.epochs=2",
                                      "lowrank.start_epoch=1",
                                      "lowrank.rank_ratio=0.25"]))
    s, lr = record["student"], record["student"]["lowrank"]
    assert lr["finetuned"] is True and lr["ranks"]
    assert lr["layer_params_after"] < lr["layer_params_before"]
    assert s["params"] < record["reference"]["params"] and s["macs"] < record["reference"]["macs"]
    plan = lowrank_plan(load_model_file(s["artifact"]))
    assert {n: p["rank"] for n, p in plan.items()} == lr["ranks"]
