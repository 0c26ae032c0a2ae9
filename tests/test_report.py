"""Ablation report: aggregation against numpy, Pareto front against brute force, and a real multirun."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from compresslab.track.plots import pareto_front
from compresslab.track.report import build_report, records_to_frame

from conftest import FAST


def _record(student, distill, seed, acc, size, lat, status="completed"):
    return {
        "status": status,
        "axes": {"student": student, "distill": distill, "seed": seed},
        "config": {"student": {"epochs": 3}},
        "student": {"acc_top1": acc, "size_bytes": size, "latency_ms_bN": lat, "size_ratio": 1e6 / size,
                    "speedup": 1.0 / lat, "speedup_ci": [0.9 / lat, 1.1 / lat]},
    }


def test_cells_are_mean_std_over_seeds_and_best_is_marked(tmp_path):
    rng = np.random.default_rng(0)
    records, values = [], {}
    for student, distill in itertools.product(["a", "b"], ["none", "kd"]):
        accs = rng.uniform(0.5, 0.9, size=3)
        values[(student, distill)] = accs
        records += [_record(student, distill, s, float(acc), 1000 + s, 1.0) for s, acc in enumerate(accs)]
    records.append(_record("a", "kd", 9, 0.0, 1, 1, status="failed"))  # failed runs are not averaged
    report = build_report(records, "student", "distill", ["acc_top1"], tmp_path)
    md = report["markdown"][0]
    for (student, distill), accs in values.items():
        cell = f"{accs.mean() * 100:.2f} ± {accs.std(ddof=1) * 100:.2f} (3)"
        assert cell in md
    for distill in ("none", "kd"):
        best = max(("a", "b"), key=lambda s: values[(s, distill)].mean())
        assert f"**{values[(best, distill)].mean() * 100:.2f}" in md
    tex = (tmp_path / "report.tex").read_text()
    assert r"\toprule" in tex and r"\textbf{" in tex and r"$\pm$" in tex
    csv = (tmp_path / "report.csv").read_text().splitlines()
    assert csv[0].startswith("metric,student,distill,mean,std,count,best_in_column") and len(csv) == 5
    assert (tmp_path / "acc_vs_size.png").stat().st_size > 1000
    assert (tmp_path / "acc_vs_speedup.png").exists()  # speed-up with its interval, not raw ms across jobs


def test_grouping_by_dotted_config_key():
    frame = records_to_frame([_record("a", "kd", 0, 0.5, 10, 1)], ["student.epochs"])
    assert frame["student.epochs"].tolist() == ["3"]


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(1)
    pts = [tuple(p) for p in rng.uniform(size=(40, 2))]
    brute = {i for i, (x, y) in enumerate(pts)
             if not any((x2 <= x and y2 >= y) and (x2, y2) != (x, y) for x2, y2 in pts)}
    assert set(pareto_front(pts)) == brute


def test_paper_numbers_are_printed_beside_ours(tmp_path):
    records = [_record("resnet20", "kd", s, 0.70 + 0.01 * s, 10, 1) for s in range(2)]
    for r in records:
        r["config"]["paper"] = {"citation": "Hinton 2015", "results": {"acc_top1": {"resnet20/kd": 0.72},
                                                                      "size_ratio": {"resnet20/kd": 3}}}
    report = build_report(records, "student", "distill", ["acc_top1"], tmp_path)
    line = next(l for l in report["paper"] if "acc_top1" in l and "resnet20/kd" in l)
    assert "72.00" in line and "70.50" in line
    line = next(l for l in report["paper"] if "size_ratio" in l)
    assert "3.00" in line and "ours 100000.00" in line


def _cli(args, cwd, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "compresslab.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.mark.slow
def test_two_by_two_by_two_seed_multirun_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    out = _cli(["-m", "student=mlp,lenet5", "student.label_smoothing=0.0,0.1", "seed=0,1", *FAST,
                f"hydra.sweep.dir={sweep}", f"paths.teacher_cache={tmp_path / 'teachers'}", "teacher.epochs=1"],
               tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted(sweep.rglob("results.json"))
    assert len(results) == 8
    assert all(json.loads(p.read_text())["status"] == "completed" for p in results)
    assert "8 completed, 0 pruned, 0 failed" in out.stdout
    # the teacher is trained once per seed and reused by the other jobs
    assert len(list((tmp_path / "teachers").glob("*.pt"))) == 2

    rep = subprocess.run([sys.executable, "-c", "import sys; from compresslab.cli import report_main; report_main(sys.argv[1:])", str(sweep), "--rows", "student",
                          "--cols", "student.label_smoothing", "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "8 completed runs, 0 pruned by the search, 0 failed" in rep.stdout
    assert rep.stdout.count("(2)") == 4  # 4 cells, each the mean of 2 seeds
    assert (tmp_path / "rep" / "acc_vs_size.png").exists() and (tmp_path / "rep" / "acc_vs_speedup.png").exists()


@pytest.mark.slow
def test_multirun_with_a_failing_job_finishes_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    out = _cli(["-m", "student=mlp,cnn1d,lenet5", *FAST, f"hydra.sweep.dir={sweep}",
                f"paths.teacher_cache={tmp_path / 'teachers'}"], tmp_path)
    assert out.returncode != 0  # the sweep reports its failure...
    statuses = {json.loads(p.read_text())["axes"]["student"]: json.loads(p.read_text())["status"]
                for p in sweep.rglob("results.json")}
    assert statuses == {"mlp": "completed", "cnn1d": "failed", "lenet5": "completed"}  # ...after running the rest
    assert "2 completed, 0 pruned, 1 failed" in out.stdout
    assert "1 of 3 sweep jobs failed" in out.stderr


def test_composite_keys_join_axis_values():
    frame = records_to_frame([_record("a", "kd", 0, 0.5, 10, 1)], ["student+distill"])
    assert frame["student+distill"].tolist() == ["a/kd"]


def test_tables_put_the_uncompressed_baseline_first_then_keep_the_sweep_order(tmp_path):
    from compresslab.track.tables import baseline_first
    from compresslab.track.results import collect_job_results

    assert baseline_first(["kd/agp", "kd/none", "none/agp", "none/none", "at/none"]) == [
        "none/none", "kd/none", "none/agp", "at/none", "kd/agp"]
    for job in (10, 2, 1):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "results.json").write_text(json.dumps({"status": "completed", "job": job}))
    assert [r["job"] for r in collect_job_results(tmp_path)] == [1, 2, 10]


# ---- backends: --backend, dotted metrics, deployed speed-up ----------------------------------
def _deployed_record(quant, seed, torch_speedup, ort_speedup, ort_acc=0.95, reliable=True, path=None):
    """A run with measure.backends=[torch,onnxruntime]: the shape deploy.step writes."""
    def figures(speedup, ms):
        return {"latency_ms_b1": ms / 10, "latency_ms_bN": ms, "speedup": speedup, "speedup_b1": speedup / 2,
                "speedup_ci": [speedup * 0.9, speedup * 1.1], "speedup_b1_ci": [speedup * 0.4, speedup * 0.6],
                "threads_b1": 1, "threads_bN": 1}

    student = {**figures(torch_speedup, 10.0 / torch_speedup), "acc_top1": 0.97, "size_bytes": 1000,
               "size_ratio": 4.0, "expected_speedup_macs": 3.0, "speedup_vs_expected": torch_speedup / 3.0,
               "latency_reliable": reliable, "latency_unreliable_short": None if reliable else "self-check 0.71",
               "deployed_speedup": 3.0 * ort_speedup, "deployed_speedup_ci": [2.5 * ort_speedup, 3.5 * ort_speedup],
               "deployed_backend": "onnxruntime", "deployed_speedup_b1": 15.0, "deployed_speedup_b1_ci": [12.0, 18.0],
               "deployed_backend_b1": "onnxruntime",
               "onnx": {"path": "artifacts/student.onnx", "max_abs_diff": 0.01, "size_bytes": 1500}}
    student["backends"] = {
        "torch": {**figures(torch_speedup, 10.0 / torch_speedup), "acc_top1": 0.97, "size_bytes": 1000},
        "onnxruntime": {**figures(ort_speedup, 3.0 / ort_speedup), "acc_top1": ort_acc, "size_bytes": 1500,
                        "settings": {"provider": "CPUExecutionProvider"}, "versions": {"onnxruntime": "1.32.0"}}}
    reference = {"size_bytes": 4000, "backends": {"torch": {"size_bytes": 4000}, "onnxruntime": {"size_bytes": 6000}}}
    return {"status": "completed", "_path": path or f"runs/{quant}/{seed}/results.json",
            "axes": {"quant": quant, "seed": seed}, "config": {"measure": {"backends": ["torch", "onnxruntime"]}},
            "student": student, "reference": reference}


def test_backend_flag_tabulates_that_backends_figures_and_says_so(tmp_path):
    records = [_deployed_record("ptq_int8", s, 1.8 + 0.1 * s, 1.7 + 0.2 * s) for s in range(2)]
    records += [_deployed_record("qat_int8", 0, 2.2, 1.6, ort_acc=0.98, reliable=False)]
    torch_report = build_report(records, "quant", None, ["speedup", "acc_top1"], None, plots=False)
    ort_report = build_report(records, "quant", None, ["speedup", "acc_top1", "size_ratio", "speedup_vs_expected",
                                                        "latency_ms_bN"], tmp_path, backend="onnxruntime")
    # torch (the default): the top-level figures, as before
    assert "| ptq_int8 | 185.00" not in torch_report["markdown"][0]
    assert "| ptq_int8 | 1.85 ± 0.07 (2) |" in torch_report["markdown"][0]
    speed, acc, size_ratio, vs_expected, latency = ort_report["markdown"]
    # onnxruntime: its speed-up vs the reference in onnxruntime, mean ± std over the two seeds (1.7, 1.9)
    assert speed.startswith("### speedup (backend onnxruntime)\n\n| quant (backend onnxruntime) | speedup |")
    assert f"| ptq_int8 | **1.80 ± {np.std([1.7, 1.9], ddof=1):.2f} (2)** |" in speed
    # single-run cell: that backend's interval, and the session's gate flag
    assert "| qat_int8 | 1.60 ± 0.00 (1) [1.44-1.76] (unreliable: self-check 0.71) |" in speed
    assert "| ptq_int8 | 95.00 ± 0.00 (2) |" in acc and "| qat_int8 | **98.00 ± 0.00 (1)** |" in acc
    assert "| ptq_int8 | **4.00 ± 0.00 (2)** |" in size_ratio  # 6000 / 1500: the .onnx files, not the .pt ones
    assert "| qat_int8 | 0.53 ± 0.00 (1)" in vs_expected  # 1.6 / the MACs ratio 3.0
    # lower is better for latency: ptq's mean of 3/1.7, 3/1.9 (1.67 ms) beats qat's 3.0/1.6 = 1.875 ms
    assert "| ptq_int8 | **1.67 ± 0.13 (2)** |" in latency and "| qat_int8 | 1.88 ± 0.00 (1) (unreliable" in latency
    b1 = build_report(records, "quant", None, ["latency_ms_b1"], None, plots=False, backend="onnxruntime")["markdown"][0]
    assert f"| ptq_int8 | **{np.mean([0.3 / 1.7, 0.3 / 1.9]):.3f} ± " in b1  # sub-millisecond: three decimals
    assert ort_report["latency_source"].startswith("latency figures (backend onnxruntime): 3 runs measured per job")
    assert r"quant (backend onnxruntime)" in (tmp_path / "report_onnxruntime.tex").read_text().replace("\\_", "_")
    csv = (tmp_path / "report_onnxruntime.csv").read_text().splitlines()
    assert csv[0].startswith("metric,backend,quant,mean") and csv[1].startswith("speedup,onnxruntime,ptq_int8,")
    assert float(csv[1].split(",")[3]) == pytest.approx(1.8)
    assert (tmp_path / "acc_vs_speedup_onnxruntime.png").stat().st_size > 1000
    assert (tmp_path / "acc_vs_size_onnxruntime.png").exists() and not (tmp_path / "report.md").exists()
    # --backend torch: the torch figures, labelled
    labelled = build_report(records, "quant", None, ["speedup"], None, plots=False, backend="torch")["markdown"][0]
    assert "| quant (backend torch) |" in labelled and "| ptq_int8 | 1.85 ± 0.07 (2) |" in labelled


def test_dotted_backend_metrics_and_deployed_speedup_with_intervals():
    from compresslab.track.metrics import LATENCY_METRICS, base_metric, is_timed, lower_is_better

    records = [_deployed_record("ptq_int8", 0, 1.8, 1.7), _deployed_record("qat_int8", 0, 2.2, 1.9)]
    report = build_report(records, "quant", None, ["backends.onnxruntime.speedup", "backends.onnxruntime.latency_ms_bN",
                                                   "backends.onnxruntime.acc_top1", "deployed_speedup",
                                                   "deployed_speedup_b1", "onnx.max_abs_diff"], None, plots=False)
    speed, latency, acc, deployed, deployed_b1, diff = report["markdown"]
    assert "| ptq_int8 | 1.70 ± 0.00 (1) [1.53-1.87] |" in speed and "| qat_int8 | **1.90 ± 0.00 (1)** [1.71-2.09] |" in speed
    assert "| ptq_int8 | 3.0 ± 0.00 (1)" not in latency and f"| qat_int8 | **{3 / 1.9:.2f} ± 0.00 (1)**" in latency
    assert "| ptq_int8 | **95.00 ± 0.00 (1)** |" in acc  # a tie: both best; accuracy in percent, not a timed figure: no notes
    assert "| qat_int8 | **5.70 ± 0.00 (1)** [4.75-6.65] (onnxruntime) |" in deployed
    assert "| ptq_int8 | **15.00 ± 0.00 (1)** [12.00-18.00] (onnxruntime) |" in deployed_b1
    assert "| ptq_int8 | **0.01 ± 0.00 (1)** |" in diff  # any dotted path to a number in the student's record
    frame = report["frame"]
    assert {"backends.onnxruntime.speedup_ci_lo", "backends.onnxruntime.speedup_b1_ci_hi", "deployed_speedup_ci_lo",
            "backends.torch.speedup_ci_hi"} <= set(frame.columns)
    assert "backends.onnxruntime.settings" not in frame  # only numbers become columns
    assert base_metric("backends.onnxruntime.latency_ms_bN") == "latency_ms_bN"
    assert lower_is_better("backends.onnxruntime.latency_ms_bN") and lower_is_better("backends.onnxruntime.size_bytes")
    assert not lower_is_better("backends.onnxruntime.speedup") and not lower_is_better("deployed_speedup")
    assert is_timed("backends.onnxruntime.speedup_b1") and is_timed("deployed_speedup")
    assert not is_timed("backends.onnxruntime.acc_top1") and {"deployed_speedup", "deployed_speedup_b1"} <= LATENCY_METRICS


def test_runs_without_the_backend_get_a_clear_message_not_a_keyerror(tmp_path):
    torch_only = [_record("lenet5", "none", s, 0.9, 1000, 1.0) for s in range(2)]
    for r, path in zip(torch_only, ("a", "b")):
        r["_path"] = f"{path}/results.json"
    with pytest.raises(SystemExit, match=r"--backend onnxruntime: none of the 2 completed runs has onnxruntime "
                                         r"figures \(student.backends.onnxruntime\); backends in these runs: torch"):
        build_report(torch_only, "student", "distill", ["speedup"], None, plots=False, backend="onnxruntime")
    with pytest.raises(SystemExit, match=r"metric 'backends.onnxruntime.speedup': no completed run has onnxruntime "
                                         r"figures .*export.onnx=true measure.backends=\[torch,onnxruntime\]"):
        build_report(torch_only, "student", "distill", ["backends.onnxruntime.speedup"], None, plots=False)
    with pytest.raises(SystemExit, match=r"metric 'backends.onnxruntime.nope' not in the onnxruntime figures"):
        build_report([_deployed_record("ptq_int8", 0, 1.8, 1.7)], "quant", None, ["backends.onnxruntime.nope"], None)
    # a mixed sweep: the torch-only run's cell is empty (never its torch figure under the backend's name)
    mixed = [_deployed_record("ptq_int8", 0, 1.8, 1.7), {**_record("none", "none", 0, 0.9, 1000, 1.0),
                                                         "axes": {"quant": "none", "seed": 0}, "_path": "t/results.json"}]
    report = build_report(mixed, "quant", None, ["speedup", "acc_top1"], tmp_path, backend="onnxruntime")
    assert "| none | – |" in report["markdown"][0] and "| ptq_int8 | **1.70 ± 0.00 (1)** [1.53-1.87] |" in report["markdown"][0]
    assert report["notes"] == ["backend onnxruntime: 1 of 2 runs have no onnxruntime figures, their cells are empty: "
                               "t/results.json"]
    assert "1 of 2 runs have no onnxruntime figures" in (tmp_path / "report_onnxruntime.md").read_text()
    assert (tmp_path / "acc_vs_speedup_onnxruntime.png").exists()  # the plot leaves the empty run out


def test_measured_together_backend_figures_win_over_the_per_job_ones():
    from compresslab.track.report import student_figures

    rec = _deployed_record("ptq_int8", 0, 1.8, 1.7)
    rec["measured_together"] = {"session": {"id": "s1"}, "student": {
        "latency_ms_bN": 5.0, "speedup": 2.0, "speedup_ci": [1.9, 2.1], "latency_reliable": True, "model_key": "k",
        "deployed_speedup": 4.0, "deployed_speedup_ci": [3.8, 4.2], "deployed_backend": "onnxruntime",
        "backends": {"torch": {"speedup": 2.0, "model_key": "k"},
                     "onnxruntime": {"latency_ms_bN": 1.0, "speedup": 2.5, "speedup_ci": [2.4, 2.6],
                                     "model_key": "k2"}}}}
    student, source = student_figures(rec, "onnxruntime")
    assert source == "measured_together" and student["speedup"] == 2.5 and student["speedup_ci"] == [2.4, 2.6]
    assert student["acc_top1"] == 0.95 and student["size_bytes"] == 1500  # exact figures from the job
    assert student["deployed_speedup"] == 4.0 and student["speedup_vs_expected"] == 2.5 / 3.0
    torch_fig, torch_source = student_figures(rec)
    assert torch_source == "measured_together" and torch_fig["speedup"] == 2.0
    assert torch_fig["backends"]["torch"]["speedup"] == 2.0  # backends.torch mirrors the top-level torch figures
    assert torch_fig["backends"]["onnxruntime"]["acc_top1"] == 0.95 and "model_key" not in torch_fig["backends"]["torch"]
    # measured together before ORT was timed there: the job's own ORT figures and the job's gate, said so
    del rec["measured_together"]["student"]["backends"]
    rec["measured_together"]["student"]["latency_reliable"] = False
    student, source = student_figures(rec, "onnxruntime")
    assert source == "per_job" and student["speedup"] == 1.7 and student["latency_reliable"] is True


def test_wandb_records_rebuild_the_nested_backend_blocks(monkeypatch):
    import types

    from compresslab.track import wandb_records as rep

    summary = {"status": "completed", "student/acc_top1": 0.97, "student/deployed_speedup": 5.1,
               "student/backends/onnxruntime/speedup": 1.7, "student/backends/onnxruntime/speedup_ci": [1.5, 1.9],
               "student/backends": {"onnxruntime": {"acc_top1": 0.95}, "torch": {"speedup": 1.8}},
               "reference/backends/onnxruntime/size_bytes": 6000, "student/backends/onnxruntime/size_bytes": 1500,
               "measured_together/session/id": "s9", "_runtime": 3}
    run = types.SimpleNamespace(summary=summary, config={"quant": {"name": "ptq_int8"}, "seed": 0}, state="finished",
                                name="run-1")
    fake = types.SimpleNamespace(Api=lambda: types.SimpleNamespace(runs=lambda project: [run]))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (rec,) = rep.load_wandb_records("me/proj")
    assert rec["student"]["backends"]["onnxruntime"] == {"acc_top1": 0.95, "speedup": 1.7, "speedup_ci": [1.5, 1.9],
                                                         "size_bytes": 1500}
    assert rec["measured_together"] == {"session": {"id": "s9"}} and rec["axes"]["quant"] == "ptq_int8"
    frame = records_to_frame([rec], ["quant"], backend="onnxruntime")
    assert frame.at[0, "speedup"] == 1.7 and frame.at[0, "speedup_ci_lo"] == 1.5 and frame.at[0, "size_ratio"] == 4.0
    assert frame.at[0, "backends.torch.speedup"] == 1.8 and frame.at[0, "deployed_speedup"] == 5.1


def test_report_cli_backend_flag(tmp_path, capsys):
    from compresslab.cli import report_main as main

    for seed in range(2):
        run = tmp_path / "sweep" / str(seed)
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(_deployed_record("ptq_int8", seed, 1.8, 1.7 + 0.2 * seed)))
    main([str(tmp_path / "sweep"), "--rows", "quant", "--cols", "", "--backend", "onnxruntime", "--metric", "speedup",
          "--metric", "deployed_speedup", "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert "### speedup (backend onnxruntime)" in out and "| ptq_int8 | **1.80 ± 0.14 (2)** |" in out
    assert "latency figures (backend onnxruntime): 2 runs measured per job" in out
    assert (tmp_path / "rep" / "report_onnxruntime.md").exists() and (tmp_path / "rep" / "acc_vs_speedup_onnxruntime.png").exists()
    with pytest.raises(SystemExit, match="none of the 2 completed runs has openvino figures"):
        main([str(tmp_path / "sweep"), "--rows", "quant", "--backend", "openvino", "--no-plots"])


def test_runs_from_two_measurement_sessions_are_not_called_comparable_in_milliseconds():
    from compresslab.track.tables import latency_source_line

    records = []
    for seed, session in ((0, "s1"), (1, "s1"), (2, "s2")):
        rec = _deployed_record("ptq_int8", seed, 1.8, 1.7)
        rec["measured_together"] = {"session": {"id": session}, "student": {"latency_ms_bN": 5.0, "speedup": 2.0,
                                                                            "speedup_ci": [1.9, 2.1]}}
        records.append(rec)
    line = latency_source_line(records_to_frame(records, ["quant"]))
    assert "3 runs measured by compresslab-measure in 2 separate sessions (s1: 2 runs, s2: 1 runs)" in line
    assert "milliseconds only within a session" in line and "comparable across runs" not in line
    one = latency_source_line(records_to_frame(records[:2], ["quant"]))
    assert "2 runs measured together in one process by compresslab-measure (session s1): comparable" in one


# ---- schema v2 and v3 (issue #23) ------------------------------------------------------------
#: one run as schema v2 wrote it: each method's report under student.<axis> *and* flat in student
V2_RECORD = {
    "schema_version": 2, "status": "completed", "axes": {"prune": "agp", "quant": "ptq_int8", "seed": 0},
    "config": {}, "student": {"acc_top1": 0.97, "size_bytes": 18537, "size_ratio": 11.08,
                              "sparsity_prunable": 0.9, "encoded_vs_dense": 0.14, "quant_backend": "pt2e_x86_onednn",
                              "prune": {"sparsity_prunable": 0.9, "encoded_vs_dense": 0.14},
                              "quant": {"quant_backend": "pt2e_x86_onednn"}},
}
V3_RECORD = {
    "schema_version": 3, "status": "completed", "axes": {"prune": "agp", "quant": "ptq_int8", "seed": 0},
    "config": {}, "student": {"acc_top1": 0.97, "size_bytes": 18537, "size_ratio": 11.08,
                              "prune": {"sparsity_prunable": 0.9, "encoded_vs_dense": 0.14},
                              "quant": {"backend": "pt2e_x86_onednn"},
                              "encodings": {"format": "compresslab.int8_pt2e/1", "stacks": ["int8", "sparse"],
                                            "not_stacked": {}}},
}


def test_the_report_reads_v2_and_v3_files_into_the_same_columns(tmp_path, capsys):
    from compresslab.cli import report_main

    frames = [records_to_frame([r], ["prune", "quant"]) for r in (V2_RECORD, V3_RECORD)]
    for frame in frames:
        assert frame.at[0, "prune.sparsity_prunable"] == 0.9 and frame.at[0, "size_ratio"] == 11.08
        assert "sparsity_prunable" not in frame.columns  # v2's flat copies are not columns of their own
    assert set(frames[0].columns) == set(frames[1].columns)
    for version, record in (("v2", V2_RECORD), ("v3", V3_RECORD)):
        (tmp_path / "sweep" / version).mkdir(parents=True)
        (tmp_path / "sweep" / version / "results.json").write_text(json.dumps(record))
    report_main([str(tmp_path / "sweep"), "--rows", "prune", "--cols", "", "--metric", "prune.sparsity_prunable",
                 "--no-plots", "--out", str(tmp_path / "rep")])
    assert "| agp | **0.90 ± 0.00 (2)** |" in capsys.readouterr().out  # both files counted


def test_the_wandb_summary_carries_the_method_blocks_and_reads_them_back(monkeypatch):
    import types

    from compresslab.track import wandb_records as rep
    from compresslab.track.wandb_glue import flatten_metrics

    summary = flatten_metrics(V3_RECORD)
    assert summary["student/prune/sparsity_prunable"] == 0.9 and summary["student/quant/backend"] == "pt2e_x86_onednn"
    run = types.SimpleNamespace(summary=summary, config={"prune": {"name": "agp"}, "seed": 0}, state="finished",
                                name="run-1")
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        Api=lambda: types.SimpleNamespace(runs=lambda project: [run])))
    (rec,) = rep.load_wandb_records("me/proj")
    assert rec["student"]["prune"] == V3_RECORD["student"]["prune"]
    assert records_to_frame([rec], ["prune"]).at[0, "prune.encoded_vs_dense"] == 0.14
