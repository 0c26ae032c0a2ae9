"""``compresslab-report``: ablation tables and accuracy/size/latency plots from many runs.

Reads ``results.json`` files under run/sweep directories (or a W&B project through the
public API), groups runs by config keys (``--rows student --cols distill``; any axis name
or dotted config key such as ``prune.final_sparsity``), and prints cells as
mean ± std over seeds with the run count, the best cell per column marked. Writes
Markdown, LaTeX (booktabs) and CSV, and PNG plots of accuracy vs size and vs latency
with the Pareto front marked. Runs from a paper preset carry the paper's numbers in
their config (``paper:``); the report prints them beside ours.

Backends (runs with ``measure.backends=[torch,onnxruntime]``): ``--backend onnxruntime`` takes
the student's figures *in that backend* (``student.backends.onnxruntime``: latency, speed-up vs
the reference in the same backend with its interval, accuracy, size; ``size_ratio`` and
``speedup_vs_expected`` recomputed from them) as its ``latency_ms_*`` / ``speedup*`` /
``acc_top1`` / ``size_bytes`` for the tables and plots, and says so in each table's header.
Any backend figure is also a metric by its dotted path (``--metric backends.onnxruntime.speedup``),
as is ``deployed_speedup`` (the fastest backend vs the torch fp32 reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from compresslab.axes import COMPRESSION_AXES
from compresslab.measure.latency import TIMED_FIGURES
from compresslab.track.metrics import BACKEND_EXACT, CI_KEYS, dotted, record_value
from compresslab.track.plots import plot_tradeoffs
from compresslab.track.tables import cell_notes, display_scale, latency_source_line, pivot, to_csv_frame, to_latex, to_markdown


def _ci_columns(row: dict, prefix: str, figures: dict) -> None:
    for key in CI_KEYS:
        ci = figures.get(f"{key}_ci")
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            row[f"{prefix}{key}_ci_lo"], row[f"{prefix}{key}_ci_hi"] = ci


def student_v3(record: dict) -> dict:
    """The record's student row as schema v3 has it: a v2 file (``schema_version`` 2 or absent) also
    copied each method's keys flat into ``student``; those copies are dropped, so a v2 and a v3 file
    give the same table (method figures as ``<axis>.<key>`` columns, see :func:`records_to_frame`)."""
    student = dict(record.get("student") or {})
    if int(record.get("schema_version") or 2) >= 3:
        return student
    for axis in COMPRESSION_AXES:
        block = student.get(axis)
        if isinstance(block, dict):
            for key, value in block.items():
                if key in student and student[key] == value:
                    del student[key]
    return student


def student_figures(record: dict, backend: str | None = None) -> tuple[dict, str | None]:
    """The student's metrics, with its timed figures taken from the sweep-level measurement
    (``measured_together``, written by ``compresslab-measure``) when the run has one; and
    which source the timed figures came from (``measured_together``, ``per_job`` or None).

    ``student["backends"]`` holds every backend's figures (``measured_together``'s timed ones
    over the per-job ones; ``backends.torch`` mirrors the top-level torch figures). With
    ``backend`` (other than torch), that backend's figures replace the student's timed figures,
    ``acc_top1`` and ``size_bytes`` (``size_ratio`` against the reference's file in the same
    backend, ``speedup_vs_expected`` recomputed); a run without them gets ``backend_missing: True``
    and those figures None, never the torch ones under the backend's name."""
    per_job = student_v3(record)
    student = dict(per_job)
    backends = {b: dict(v) for b, v in (student.get("backends") or {}).items() if isinstance(v, dict)}
    together = dict((record.get("measured_together") or {}).get("student") or {})
    together_backends = {b: dict(v) for b, v in (together.pop("backends", None) or {}).items() if isinstance(v, dict)}
    if together:
        student.update({k: v for k, v in together.items() if k != "model_key"})
        source = "measured_together"
    else:
        source = "per_job" if student.get("latency_ms_bN") is not None else None
    for b, figures in together_backends.items():
        backends[b] = {**backends.get(b, {}), **{k: v for k, v in figures.items() if k != "model_key"}}
    if together and "torch" in backends:
        backends["torch"].update({k: together[k] for k in TIMED_FIGURES if k in together})
    if backends:
        student["backends"] = backends
    student["torch_latency_source"] = source  # the torch figures' source, whatever ``backend`` picks below
    if backend is not None:
        student["backend"] = backend
    if backend not in (None, "torch"):
        figures = backends.get(backend) or {}
        timed = figures.get("latency_ms_bN") is not None or figures.get("latency_ms_b1") is not None
        if together_backends.get(backend, {}).get("latency_ms_bN") is not None:
            source = "measured_together"
        elif timed:
            source = "per_job"
            for k in ("latency_reliable", "latency_unreliable_reason", "latency_unreliable_short"):
                student[k] = per_job.get(k)  # the gate of the session that timed these figures
        else:
            source = None
        student["backend_missing"] = not figures
        for k in TIMED_FIGURES + BACKEND_EXACT:
            student[k] = figures.get(k)
        ref_size = ((((record.get("reference") or {}).get("backends") or {}).get(backend) or {}).get("size_bytes"))
        student["size_ratio"] = ref_size / student["size_bytes"] if ref_size and student["size_bytes"] else None
        student.pop("speedup_vs_expected", None)
    if student.get("expected_speedup_macs") and student.get("speedup") and (together or backend not in (None, "torch")):
        student["speedup_vs_expected"] = student["speedup"] / student["expected_speedup_macs"]
    return student, source


def records_to_frame(records: Iterable[dict], keys: Sequence[str], backend: str | None = None,
                     metrics: Sequence[str] = ()) -> pd.DataFrame:
    """One row per completed run: the grouping keys, and the student's (and teacher's) metrics;
    ``latency_source`` says where the timed figures came from (:func:`student_figures`).
    Every backend's numeric figures are columns ``backends.<backend>.<key>`` (speed-up
    intervals as ``..._ci_lo`` / ``..._ci_hi``), and any other dotted ``metrics`` path into the
    student's record that ends at a number (``onnx.max_abs_diff``) a column of that name."""
    rows = []
    for r in records:
        if r.get("status") != "completed":
            continue
        row = {k: str(record_value(r, k)) for k in keys}
        row["seed"] = (r.get("axes") or {}).get("seed")
        student, source = student_figures(r, backend)
        row.update({k: v for k, v in student.items() if isinstance(v, (int, float))})
        _ci_columns(row, "", student)
        for name, figures in (student.get("backends") or {}).items():
            row.update({f"backends.{name}.{k}": v for k, v in figures.items() if isinstance(v, (int, float))})
            _ci_columns(row, f"backends.{name}.", figures)
        for axis in COMPRESSION_AXES:  # each method's own figures (schema v3: only there)
            block = student.get(axis) if isinstance(student.get(axis), dict) else {}
            row.update({f"{axis}.{k}": v for k, v in block.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for metric in metrics:
            value = dotted(student, metric) if "." in metric and metric not in row else None
            if isinstance(value, (int, float)):
                row[metric] = value
        for key in ("deployed_backend", "deployed_backend_b1"):
            row[key] = student.get(key)
        row["backend"] = backend
        row["backends_present"] = ",".join(sorted(student.get("backends") or
                                                  ({"torch": 1} if student["torch_latency_source"] else {})))
        row["run"] = str(r.get("_path") or r.get("run_dir") or "")
        row["latency_unreliable_short"] = student.get("latency_unreliable_short") or student.get(
            "latency_unreliable_reason")
        row["latency_source"] = source
        row["latency_session"] = ((r.get("measured_together") or {}).get("session") or {}).get("id")
        row["teacher_acc_top1"] = (r.get("teacher") or {}).get("acc_top1")
        rows.append(row)
    return pd.DataFrame(rows)


def paper_rows(records: Sequence[dict], frame: pd.DataFrame, rows: str, cols: str | None) -> list[str]:
    """Lines "ours vs paper" for runs whose config carries the paper's numbers.

    A paper preset stores ``paper.results`` as ``{metric: {"<row>" or "<row>/<col>": value}}``
    (same units as ours; accuracy as a fraction), next to ``paper.citation``.
    """
    papers = {}
    for r in records:
        paper = (r.get("config") or {}).get("paper")
        if paper and paper.get("results"):
            papers[paper.get("citation", "paper")] = paper
    lines = []
    for citation, paper in papers.items():
        lines.append(f"paper: {citation}")
        for metric, values in paper["results"].items():
            mean = pivot(frame, rows, cols, metric)[0] if metric in frame else None
            for key, value in values.items():
                row, _, col = str(key).partition("/")
                if mean is not None and not col and len(mean.columns) == 1:
                    col = mean.columns[0]
                ours = (mean.at[row, col] if mean is not None and row in mean.index and col in mean.columns
                        else None)
                s = display_scale(metric)
                ours_txt = "no run" if ours is None or pd.isna(ours) else f"{ours * s:.2f}"
                lines.append(f"  {metric:10s} {key:32s} paper {float(value) * s:7.2f}   ours {ours_txt}")
    return lines


def _backends_in(frame: pd.DataFrame) -> str:
    present = sorted({b for v in frame.get("backends_present", pd.Series(dtype=object)).dropna() for b in v.split(",")
                      if b})
    return ", ".join(present) or "none (no timed figures)"


_HOW = "(a run has them with export.onnx=true measure.backends=[torch,onnxruntime])"


def check_backend(frame: pd.DataFrame, backend: str | None) -> list[str]:
    """``--backend``: a clear error when no run has the backend's figures, and a note naming the
    runs that lack them (their cells stay empty rather than showing torch figures)."""
    if backend in (None, "torch") or frame.empty:
        return []
    missing = frame["backend_missing"].fillna(True).astype(bool)
    if missing.all():
        raise SystemExit(f"--backend {backend}: none of the {len(frame)} completed runs has {backend} figures "
                         f"(student.backends.{backend}); backends in these runs: {_backends_in(frame)} {_HOW}")
    notes = []
    if missing.any():
        runs = ", ".join(frame.loc[missing, "run"].astype(str).tolist()[:5]) + (" ..." if missing.sum() > 5 else "")
        notes.append(f"backend {backend}: {int(missing.sum())} of {len(frame)} runs have no {backend} figures, "
                     f"their cells are empty: {runs}")
    timed = frame.loc[~missing, "latency_ms_bN"] if "latency_ms_bN" in frame else pd.Series(dtype=float)
    untimed = int(pd.to_numeric(timed, errors="coerce").isna().sum())
    if untimed:
        notes.append(f"backend {backend}: {untimed} runs have {backend} files but no {backend} latency (deferred: "
                     f"compresslab-measure <dir> times them)")
    return notes


def _missing_metric(frame: pd.DataFrame, metric: str) -> str:
    parts = metric.split(".")
    if parts[0] == "backends" and len(parts) >= 3:
        prefix = f"backends.{parts[1]}."
        have = sorted(c[len(prefix):] for c in frame.columns if c.startswith(prefix))
        if not have:
            return (f"metric '{metric}': no completed run has {parts[1]} figures (student.backends.{parts[1]}); "
                    f"backends in these runs: {_backends_in(frame)} {_HOW}")
        return f"metric '{metric}' not in the {parts[1]} figures; available: {have}"
    return f"metric '{metric}' not in results; available: {sorted(c for c in frame.columns)}"


def build_report(records: list[dict], rows: str, cols: str | None, metrics: Sequence[str], out_dir: Path | None,
                 formats: Sequence[str] = ("md", "latex", "csv"), plots: bool = True,
                 backend: str | None = None) -> dict[str, Any]:
    """Tables (per metric) and plots for ``records``; returns the texts and written paths.
    ``backend``: tabulate and plot the student's figures in that backend (:func:`student_figures`);
    the headers say so and the files are ``report_<backend>.*``, ``acc_vs_*_<backend>.png``."""
    keys = [rows] + ([cols] if cols else [])
    frame = records_to_frame(records, keys, backend, metrics)
    out: dict[str, Any] = {"markdown": [], "latex": [], "paths": [], "frame": frame, "paper": [],
                           "latency_source": None, "notes": [], "backend": backend}
    if frame.empty:
        return out
    out["notes"] = check_backend(frame, backend)
    title = f" (backend {backend})" if backend else ""
    csv_parts = []
    for metric in metrics:
        if metric not in frame:
            raise SystemExit(_missing_metric(frame, metric))
        mean, std, count, best = pivot(frame, rows, cols, metric)
        notes = cell_notes(frame, rows, cols, metric, mean.index, mean.columns)
        out["markdown"].append(f"### {metric}{title}\n\n" +
                               to_markdown(mean, std, count, best, metric, rows, notes, backend))
        out["latex"].append(f"% {metric}{title}\n" + to_latex(mean, std, count, best, metric, rows, notes, backend))
        csv_parts.append(to_csv_frame(frame, rows, cols, metric, backend))
    out["paper"] = paper_rows(records, frame, rows, cols)
    out["latency_source"] = latency_source_line(frame)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"report_{backend}" if backend else "report"
        if "md" in formats:
            p = out_dir / f"{stem}.md"
            source = [out["latency_source"]] if out["latency_source"] else []
            p.write_text("\n\n".join(out["markdown"] + source + out["notes"]
                                      + (["```", *out["paper"], "```"] if out["paper"] else [])) + "\n")
            out["paths"].append(p)
        if "latex" in formats:
            p = out_dir / f"{stem}.tex"
            p.write_text("\n\n".join(out["latex"]) + "\n")
            out["paths"].append(p)
        if "csv" in formats:
            p = out_dir / f"{stem}.csv"
            pd.concat(csv_parts).to_csv(p, index=False)
            out["paths"].append(p)
        if plots and {"size_bytes", "acc_top1"} <= set(frame.columns):
            out["paths"] += plot_tradeoffs(frame, keys, out_dir, backend)
    return out


