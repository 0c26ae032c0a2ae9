"""Measurement helpers against hand computations."""

import json

import pytest
import torch
from torch import nn

from compresslab.measure import count_macs, count_params, evaluate_accuracy, measure_latency
from compresslab.track import read_results, write_results


def test_count_params_and_sparsity_against_manual_count():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0].zero_()  # 4 zeros
        model[2].bias.zero_()  # 2 zeros
    stats = count_params(model)
    assert stats["params"] == 4 * 3 + 3 + 3 * 2 + 2
    assert stats["params_nonzero"] == stats["params"] - 6
    assert stats["sparsity"] == pytest.approx(6 / 23)


def test_macs_of_linear_and_conv_match_hand_computation():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 10))
    assert count_macs(mlp, torch.randn(1, 1, 8, 8)) == 64 * 30 + 30 * 10
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    # each of 5*8*8 outputs needs 3*3*3 MACs
    assert count_macs(conv, torch.randn(1, 3, 8, 8)) == 5 * 8 * 8 * 27
    assert count_macs(conv, torch.randn(2, 3, 8, 8)) == 2 * 5 * 8 * 8 * 27


def test_latency_reports_median_below_p90():
    model = nn.Linear(16, 16)
    lat = measure_latency(model, torch.randn(4, 16), warmup=2, iters=20)
    assert 0 < lat["median_ms"] <= lat["p90_ms"]


def test_evaluate_accuracy_counts_correct_predictions():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()

    x = torch.tensor([[0.0], [1.0], [2.0], [2.0]])
    y = torch.tensor([0, 1, 1, 2])
    assert evaluate_accuracy(Fixed(), [(x[:2], y[:2]), (x[2:], y[2:])]) == pytest.approx(0.75)


def test_results_are_written_atomically_as_json(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_results(path, {"status": "completed", "x": float("nan"), "t": torch.tensor(2.5)})
    assert read_results(path) == {"status": "completed", "x": None, "t": 2.5}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp files left
    json.loads(path.read_text())
