"""The latency engine's uncertainty and noise gate, and sweep-level measurement
(``compresslab-measure``, ``measure.defer``) with the report saying which figures it used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compresslab.measure.latency import LatencySettings, Session, Timed, TWIN_SUFFIX, ratio_interval
from compresslab.track.console import cell
from conftest import FAST


def _timed(values_per_round: list[list[float]]) -> Timed:
    return Timed(rounds=[list(map(float, r)) for r in values_per_round])


def _session(ref: list[list[float]], twin: list[list[float]], other: list[list[float]], **settings) -> Session:
    timed = {key: {"reference": _timed(ref), "reference" + TWIN_SUFFIX: _timed(twin), "other": _timed(other)}
             for key in ("b1", "bN")}
    return Session(timed, 1, 1, {"loadavg_1m": 4.1, "other_cpu_fraction": 0.5}, None, "reference",
                   LatencySettings(**settings))


def test_ratio_interval_brackets_the_true_ratio_and_narrows_with_rounds():
    rng = np.random.default_rng(0)
    fast = [list(1.0 + 0.05 * rng.standard_normal(5)) for _ in range(20)]
    slow = [list(2.0 + 0.10 * rng.standard_normal(5)) for _ in range(20)]
    point, (lo, hi) = ratio_interval(_timed(slow), _timed(fast))
    assert point == pytest.approx(2.0, rel=0.05) and lo < 2.0 < hi and hi - lo < 0.1
    _, (lo3, hi3) = ratio_interval(_timed(slow[:3]), _timed(fast[:3]))
    assert hi3 - lo3 > hi - lo  # fewer rounds, wider interval
    assert ratio_interval(_timed(slow[:1]), _timed(fast[:1]))[1][0] == ratio_interval(_timed(slow[:1]), _timed(fast[:1]))[1][1]


def test_gate_trusts_a_quiet_measurement_and_gives_speedups_with_intervals():
    quiet = [[1.0, 1.01, 0.99]] * 7
    session = _session(quiet, quiet, [[0.5, 0.505, 0.495]] * 7)
    gate = session.gate()
    assert gate["reliable"] and gate["reason"] is None
    assert gate["self_check"] == {"b1": pytest.approx(1.0), "bN": pytest.approx(1.0)}
    speed = session.speedups("other", "reference")
    assert speed["speedup"] == pytest.approx(2.0, rel=0.02) and speed["speedup_ci"][0] <= 2.0 <= speed["speedup_ci"][1] + 1e-9


def test_gate_flags_a_twin_that_disagrees_with_itself():
    ref = [[1.0, 1.0, 1.0]] * 7
    session = _session(ref, [[1.4, 1.4, 1.4]] * 7, ref)  # the reference "measured" 1.4x slower the second time
    gate = session.gate()
    assert not gate["reliable"]
    assert "self-check 0.71 at b1" in gate["reason"] and "load 4.1" in gate["reason"]
    assert gate["short_reason"].startswith("self-check 0.71") and gate["short_reason"].endswith("load 4.1")


def test_gate_flags_a_wide_interval_and_a_large_spread():
    rng = np.random.default_rng(1)
    noisy = [list(1.0 + 0.6 * rng.random(3)) for _ in range(4)]
    noisy_twin = [list(1.0 + 0.6 * rng.random(3)) for _ in range(4)]
    gate = _session(noisy, noisy_twin, noisy, max_twin_deviation=1.0, max_ci_width=0.05).gate()
    assert not gate["reliable"] and "self-check interval" in gate["reason"]
    spread = _session([[1.0, 3.0, 1.0, 3.0]] * 7, [[1.0, 3.0, 1.0, 3.0]] * 7, [[1.0] * 4] * 7).gate()
    assert not spread["reliable"] and spread["reason"].startswith("spread 1.00 (IQR/median of reference/")


def test_wall_clock_gate_counts_other_processes_cpu_share():
    quiet = [[1.0, 1.0]] * 7
    assert _session(quiet, quiet, quiet, clock="cpu").gate()["reliable"]  # the cpu clock doesn't count their slices
    wall = _session(quiet, quiet, quiet, clock="wall").gate()
    assert not wall["reliable"] and "other processes 50% of CPU" in wall["reason"]


def test_console_cells_show_intervals_and_never_a_confident_unreliable_number():
    row = {"speedup": 0.24, "speedup_ci": [0.2, 0.3], "latency_reliable": False, "latency_unreliable_short": "load 4.1"}
    assert cell(row, "speedup", "{:.2f}x") == "0.24x [0.20-0.30] (unreliable: load 4.1)"
    assert cell({**row, "latency_reliable": True}, "speedup", "{:.2f}x") == "0.24x [0.20-0.30]"
    assert cell({"latency_deferred": True}, "latency_ms_bN", "{:.3f}") == "deferred"
    assert cell(row, "size_ratio", "{:.2f}x") == "-"  # exact figures are never flagged


def test_settings_reject_an_unknown_clock():
    with pytest.raises(ValueError, match="measure.clock must be cpu or wall"):
        LatencySettings(clock="tsc")


def _cli(args, cwd, entry="main"):
    """Run the console command ``compresslab.cli.<entry>`` (``main`` is ``compresslab``) in a fresh process."""
    command = [sys.executable, "-m", "compresslab.cli"] if entry == "main" else \
        [sys.executable, "-c", f"import sys; from compresslab.cli import {entry}; {entry}(sys.argv[1:])"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})


@pytest.mark.slow
def test_deferred_sweep_is_measured_together_in_one_process_and_the_report_says_so(tmp_path):
    sweep = tmp_path / "sweep"
    out = _cli(["-m", "teacher=none", "distill=none", "student=lenet5", "seed=0,1", "measure.defer=true", *FAST,
                "measure.latency_rounds=3", f"hydra.sweep.dir={sweep}", f"paths.teacher_cache={tmp_path / 't'}",
                "+hydra.callbacks.sweep_summary.report={rows: seed, cols: null, metrics: [acc_top1, speedup]}"],
               tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(records) == 2
    for r in records:  # the jobs themselves timed nothing ...
        assert r["student"]["latency_deferred"] and "latency_ms_bN" not in r["student"]
    blocks = [r["measured_together"] for r in records]  # ... the sweep timed them all at its end, in one process
    assert len({b["session"]["id"] for b in blocks}) == 1 and len({b["session"]["pid"] for b in blocks}) == 1
    assert blocks[0]["session"]["runs"] == 2 and blocks[0]["session"]["settings"]["rounds"] == 3
    for b in blocks:
        for row in ("reference", "student"):
            assert b[row]["latency_ms_b1"] > 0 and b[row]["latency_ms_bN_iqr"] >= 0
            lo, hi = b[row]["speedup_ci"]
            assert lo <= b[row]["speedup"] <= hi and isinstance(b[row]["latency_reliable"], bool)
    # identical files are timed once: as many distinct files as distinct keys
    assert blocks[0]["session"]["models"] == len({b[row]["model_key"] for b in blocks for row in ("reference", "student")})
    assert "measured together in one process by compresslab-measure" in out.stdout
    assert "latency figures:" in (sweep / "report.md").read_text() and (sweep / "acc_vs_speedup.png").exists()

    # re-measuring replaces the block with a new session's figures and leaves the training figures alone
    before = {p: json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))}
    again = _cli([sweep, "--rounds", "2", "--round-ms", "1"], tmp_path, entry="measure_main")
    assert again.returncode == 0, again.stderr[-3000:]
    for path, old in before.items():
        new = json.loads(path.read_text())
        assert new["measured_together"]["session"]["id"] != old["measured_together"]["session"]["id"]
        assert new["measured_together"]["session"]["settings"]["rounds"] == 2
        assert {k: v for k, v in new.items() if k != "measured_together"} == \
               {k: v for k, v in old.items() if k != "measured_together"}
    report = _cli([sweep, "--rows", "seed", "--cols", "", "--metric", "speedup", "--no-plots"], tmp_path,
                  entry="report_main")
    assert report.returncode == 0, report.stderr[-2000:]
    assert "latency figures: 2 runs measured together" in report.stdout


def test_report_marks_unreliable_cells_and_speedups_far_below_the_macs_ratio(tmp_path):
    from compresslab.track.report import build_report

    def record(seed, prune, speedup, reliable, macs_ratio):
        return {"status": "completed", "axes": {"prune": prune, "seed": seed},
                "student": {"acc_top1": 0.9, "size_bytes": 100, "speedup": speedup, "speedup_ci": [speedup * 0.9, speedup * 1.1],
                            "latency_ms_bN": 1.0, "latency_reliable": reliable, "expected_speedup_macs": macs_ratio,
                            "latency_unreliable_short": None if reliable else "self-check 1.31, load 4.1"}}

    records = [record(0, "none", 1.0, True, 1.0), record(0, "structured", 1.2, True, 4.0),
               record(0, "agp", 6.29, False, 1.0)]
    report = build_report(records, "prune", None, ["speedup"], None, plots=False)
    table = report["markdown"][0]
    assert "| agp | **6.29 ± 0.00 (1)** [5.66-6.92] (unreliable: self-check 1.31, load 4.1) |" in table
    assert "(MACs predict 4.00x)" in table.split("| structured |")[1].split("\n")[0]
    assert "unreliable" not in table.split("| none |")[1].split("\n")[0]
    assert report["latency_source"].startswith("latency figures: 3 runs measured per job")


# ---- compresslab-measure times the ONNX Runtime backend too ---------------------------------
_REF_ARCH = {"_target_": "compresslab.models.MLP", "hidden": [256, 256]}


@pytest.fixture(scope="module")
def ort_runs(tmp_path_factory):
    """Four run dirs of real artifacts and their ONNX exports (MLPs on 8x8 inputs), sharing one
    reference (the same bytes copied into each run, .pt and .onnx alike):
    a/ and b/ ask for onnxruntime (different students), c/ only for torch (a's student),
    d/ for onnxruntime but its student's .onnx is gone (b's student)."""
    import shutil

    import torch

    from compresslab.artifact import read_payload, save_model_file
    from compresslab.deploy.export import export_payload
    from compresslab.models import build_model

    root = tmp_path_factory.mktemp("ort_runs")
    src = root / "src"
    src.mkdir()
    files = {}
    for name, hidden in (("reference", [256, 256]), ("small", [16]), ("tiny", [8])):
        torch.manual_seed(0)
        arch = {**_REF_ARCH, "hidden": hidden}
        pt = save_model_file(src / f"{name}.pt", build_model(arch, [1, 8, 8], 10).eval(), arch, [1, 8, 8], 10)
        info = export_payload(read_payload(pt), src / f"{name}.onnx")
        files[name] = (pt, src / f"{name}.onnx", info["size_bytes"])
    sweep = root / "sweep"
    plan = {"a": ("small", ["torch", "onnxruntime"]), "b": ("tiny", ["torch", "onnxruntime"]),
            "c": ("small", ["torch"]), "d": ("tiny", ["torch", "onnxruntime"])}
    for seed, (run, (student, backends)) in enumerate(plan.items()):
        art = sweep / run / "artifacts"
        art.mkdir(parents=True)
        record = {"status": "completed", "axes": {"seed": seed, "student": student},
                  "config": {"measure": {"latency_batch": 8, "backends": backends}, "export": {"onnx": True}}}
        for row, name in (("reference", "reference"), ("student", student)):
            pt, onnx, onnx_size = files[name]
            shutil.copy(pt, art / f"{row}.pt")
            shutil.copy(onnx, art / f"{row}.onnx")
            record[row] = {"artifact": f"artifacts/{row}.pt", "acc_top1": 0.5, "size_bytes": pt.stat().st_size,
                           "onnx": {"path": str(art / f"{row}.onnx"), "size_bytes": onnx_size},
                           "latency_deferred": True}
            if "onnxruntime" in backends:
                record[row]["backends"] = {"torch": {"acc_top1": 0.5, "size_bytes": pt.stat().st_size},
                                           "onnxruntime": {"acc_top1": 0.25, "size_bytes": onnx_size}}
        (sweep / run / "results.json").write_text(json.dumps(record))
    (sweep / "d" / "artifacts" / "student.onnx").unlink()
    return sweep


def test_measure_together_times_onnx_files_beside_the_artifacts_in_one_session(ort_runs, capsys):
    from compresslab.measure.together import measure_together, print_measured

    settings = LatencySettings(warmup=1, rounds=3, round_ms=1.0, threads_bN=1)
    result = measure_together([ort_runs], settings, write=True)
    session = result["session"]
    # distinct files: reference .pt/.onnx (identical in all four runs), small .pt/.onnx, tiny .pt/.onnx
    # (d's tiny.onnx is gone, c's small.onnx is not wanted): each timed once, in one group
    assert session["models"] == 6 and session["runs"] == 4 and len(session["groups"]) == 1
    assert session["backends"] == ["torch", "onnxruntime"]
    assert any("student.onnx" in line and "no such ONNX file" in line for line in result["skipped"])
    blocks = {Path(p).parent.name: b for p, b in result["runs"].items()}

    for run in ("a", "b"):
        st, ref = blocks[run]["student"], blocks[run]["reference"]
        ort, ort_ref = st["backends"]["onnxruntime"], ref["backends"]["onnxruntime"]
        assert ort["model_key"].startswith("student.onnx@") and ort["latency_ms_b1"] > 0 and ort["latency_ms_bN"] > 0
        for key in ("speedup", "speedup_b1"):  # vs the run's reference in ONNX Runtime, with its interval
            lo, hi = ort[f"{key}_ci"]
            assert lo <= ort[key] <= hi
            assert ort[key] == pytest.approx(ort_ref[f"latency_ms_{'bN' if key == 'speedup' else 'b1'}"] /
                                             ort[f"latency_ms_{'bN' if key == 'speedup' else 'b1'}"])
        assert ort_ref["speedup"] == pytest.approx(1.0) and ort["intra_op_num_threads_bN"] == 1
        assert ort["settings"]["intra_op_allow_spinning"] is False and "onnxruntime" in ort["versions"]
        assert st["backends"]["torch"]["speedup"] == st["speedup"]
        # deployed: the faster of torch's student and ORT's student, both vs the torch fp32 reference
        ort_vs_torch = ref["latency_ms_bN"] / ort["latency_ms_bN"]
        assert st["deployed_speedup"] == pytest.approx(max(st["speedup"], ort_vs_torch))
        assert st["deployed_backend"] == ("onnxruntime" if ort_vs_torch > st["speedup"] else "torch")
        assert st["deployed_backend_b1"] in ("torch", "onnxruntime") and len(st["deployed_speedup_b1_ci"]) == 2
        assert isinstance(st["latency_reliable"], bool)
    # the shared reference .onnx is one model: the same figures in both runs
    assert blocks["a"]["reference"]["backends"]["onnxruntime"] == blocks["b"]["reference"]["backends"]["onnxruntime"]
    assert blocks["a"]["student"]["backends"]["onnxruntime"]["model_key"] != \
        blocks["b"]["student"]["backends"]["onnxruntime"]["model_key"]
    # c asked for torch only; d's student has no .onnx: torch figures, no ORT ones, no deployed speed-up
    assert "backends" not in blocks["c"]["student"] and "deployed_speedup" not in blocks["c"]["student"]
    assert "backends" not in blocks["d"]["student"] and "onnxruntime" in blocks["d"]["reference"]["backends"]
    assert blocks["c"]["student"]["model_key"] == blocks["a"]["student"]["model_key"]  # same .pt, timed once
    print_measured(result)
    printed = capsys.readouterr().out
    assert printed.count("    onnxruntime: ") == 2 and "vs the torch fp32 reference" in printed
    written = json.loads((ort_runs / "a" / "results.json").read_text())
    assert written["measured_together"]["student"]["backends"]["onnxruntime"]["latency_ms_bN"] == \
        blocks["a"]["student"]["backends"]["onnxruntime"]["latency_ms_bN"]

    # the report takes these figures with --backend onnxruntime (timed together; ORT accuracy and size per job)
    from compresslab.track.report import build_report
    from compresslab.track.results import collect_job_results

    records = collect_job_results(ort_runs)
    report = build_report(records, "seed", None, ["speedup", "acc_top1", "deployed_speedup"], None, plots=False,
                          backend="onnxruntime")
    frame = report["frame"].set_index("seed")
    a_ort = blocks["a"]["student"]["backends"]["onnxruntime"]
    assert frame.at[0, "speedup"] == pytest.approx(a_ort["speedup"])
    assert frame.at[0, "speedup_ci_lo"] == pytest.approx(a_ort["speedup_ci"][0])
    assert frame.at[0, "acc_top1"] == 0.25 and frame.at[0, "latency_source"] == "measured_together"
    assert frame.at[0, "deployed_speedup"] == pytest.approx(blocks["a"]["student"]["deployed_speedup"])
    assert pd_isna(frame.at[2, "speedup"]) and pd_isna(frame.at[3, "speedup"])  # c: no ORT; d: ORT not timed
    assert "| seed (backend onnxruntime) |" in report["markdown"][0]
    assert "latency figures (backend onnxruntime): 2 runs measured together" in report["latency_source"]
    assert any("1 of 4 runs have no onnxruntime figures" in n for n in report["notes"])
    assert any("1 runs have onnxruntime files but no onnxruntime latency" in n for n in report["notes"])


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
