"""Ablation report: aggregation against numpy, Pareto front against brute force, and a real multirun."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from compresslab.track.report import build_report, pareto_front, records_to_frame

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
    assert "8 completed, 0 failed" in out.stdout
    # the teacher is trained once per seed and reused by the other jobs
    assert len(list((tmp_path / "teachers").glob("*.pt"))) == 2

    rep = subprocess.run([sys.executable, "-m", "compresslab.track.report", str(sweep), "--rows", "student",
                          "--cols", "student.label_smoothing", "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "8 completed runs, 0 failed" in rep.stdout
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
    assert "2 completed, 1 failed" in out.stdout
    assert "1 of 3 sweep jobs failed" in out.stderr


def test_composite_keys_join_axis_values():
    frame = records_to_frame([_record("a", "kd", 0, 0.5, 10, 1)], ["student+distill"])
    assert frame["student+distill"].tolist() == ["a/kd"]


def test_tables_put_the_uncompressed_baseline_first_then_keep_the_sweep_order(tmp_path):
    from compresslab.track.report import baseline_first
    from compresslab.track.sweep import collect_job_results

    assert baseline_first(["kd/agp", "kd/none", "none/agp", "none/none", "at/none"]) == [
        "none/none", "kd/none", "none/agp", "at/none", "kd/agp"]
    for job in (10, 2, 1):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "results.json").write_text(json.dumps({"status": "completed", "job": job}))
    assert [r["job"] for r in collect_job_results(tmp_path)] == [1, 2, 10]
