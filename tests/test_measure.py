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
    lat = measure_latency(model, torch.randn(4, 16), warmup=2, rounds=3, round_ms=2)
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


def test_pipeline_profiles_the_saved_files_in_a_fresh_process(make_cfg, tmp_path):
    from pathlib import Path

    from compresslab.artifact import load_model_file
    from compresslab.measure import profile
    from compresslab.measure.latency import LatencySettings
    from compresslab.pipeline import run_experiment

    first = run_experiment(make_cfg(["measure.fresh_process=true", "teacher=none", "student=convnet",
                                     "measure.threads_bN=1"]))  # not "auto": the idle probe could differ
    assert first["student"]["measured_in"] == "fresh_process"
    assert first["student"]["fresh_process_max_abs_diff"] == 0.0
    # what the child measured is what the file holds
    saved = load_model_file(Path(first["student"]["artifact"]))
    here = profile(saved, torch.zeros(1, 1, 8, 8), torch.zeros(8, 1, 8, 8), LatencySettings(warmup=0, rounds=1, round_ms=1,
                                                                                          threads_bN=1))
    assert first["student"]["dtypes"] == ["float32"] and first["student"]["input_dtype"] == "float32"
    for key in ("params", "params_nonzero", "macs", "latency_batch", "threads", "dtypes"):
        assert first["student"][key] == here[key], key
    # a teacher given as a Lightning checkpoint has no model file: it is measured from a temporary one
    ckpt = tmp_path / "run" / "checkpoints" / "student" / "best.ckpt"
    second = run_experiment(make_cfg(["measure.fresh_process=true", "teacher=convnet", f"teacher.ckpt={ckpt}",
                                      f"paths.run_dir={tmp_path / 'run2'}"]))
    teacher = second["teacher"]
    assert teacher["source"] == "checkpoint" and teacher["measured_in"] == "fresh_process"
    assert teacher["fresh_process_max_abs_diff"] == 0.0
    assert teacher["size_bytes"] == ckpt.stat().st_size and teacher["params"] == first["student"]["params"]


def test_an_artifact_that_needs_state_of_the_training_process_fails_in_the_fresh_process(tmp_path, monkeypatch):
    from compresslab.artifact import ARTIFACT_LOADERS, atomic_torch_save, load_model_file
    from compresslab.measure.fresh import measure_in_fresh_process

    # a loader listed only in this process's table (the fresh process reads the table from source)
    monkeypatch.setitem(ARTIFACT_LOADERS.entries, "tests.in_memory/1", ("torch.nn.modules.linear", "Identity"))
    atomic_torch_save({"format": "tests.in_memory/1"}, tmp_path / "odd.pt")
    assert isinstance(load_model_file(tmp_path / "odd.pt"), nn.Identity)  # loads here ...
    with pytest.raises(RuntimeError, match="fresh process.*Refused artifact format"):  # ... not on its own
        measure_in_fresh_process({"student": tmp_path / "odd.pt"}, torch.zeros(1, 4), torch.zeros(3, 4))


def test_latency_of_several_models_is_measured_interleaved_in_rotating_order():
    from compresslab.measure import interleaved_latency

    calls = []

    class Recorder(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            calls.append(self.tag)
            return x

    result = interleaved_latency({n: Recorder(n) for n in "abc"}, torch.zeros(1), warmup=3, rounds=3, round_ms=1)
    runs = [tag for i, tag in enumerate(calls) if i == 0 or calls[i - 1] != tag]  # consecutive calls merged
    assert calls[:3] == ["a"] * 3  # each model's warm-up (at least 3 calls) comes first
    assert runs == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then rounds in rotating order
    assert set(result) == {"a", "b", "c"} and all(0 <= r["median_ms"] <= r["p90_ms"] for r in result.values())


def test_auto_threads_at_batch_n_leave_one_core_to_the_machine(monkeypatch):
    from compresslab.measure import latency
    from compresslab.measure.latency import LatencySettings, auto_threads_bN, time_models

    assert [auto_threads_bN(True, c) for c in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert auto_threads_bN(False, 16) == 1  # a busy machine: one thread, whatever its size
    monkeypatch.setattr(latency, "idle", lambda: (True, {"other_cpu_fraction": 0.0}))
    monkeypatch.setattr(latency, "physical_cores", lambda: 3)
    model = nn.Linear(4, 2).eval()
    session = time_models({"m": model}, torch.randn(1, 4), torch.randn(8, 4),
                          LatencySettings(warmup=1, rounds=2, round_ms=1.0, threads_bN="auto"))
    assert session.threads_bN == 2 and session.idle_probe == {"other_cpu_fraction": 0.0}
    # 2 cores: 1 thread whether idle or not, so the idle probe is not run at all
    monkeypatch.setattr(latency, "physical_cores", lambda: 2)
    monkeypatch.setattr(latency, "idle", lambda: pytest.fail("probed the load for a foregone answer"))
    session = time_models({"m": model}, torch.randn(1, 4), torch.randn(8, 4),
                          LatencySettings(warmup=1, rounds=2, round_ms=1.0, threads_bN="auto"))
    assert session.threads_bN == 1 and session.idle_probe is None
