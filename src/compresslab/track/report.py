"""``compresslab-report``: ablation tables and accuracy/size/latency plots from many runs.

Reads ``results.json`` files under run/sweep directories (or a W&B project through the
public API), groups runs by config keys (``--rows student --cols distill``; any axis name
or dotted config key such as ``prune.final_sparsity``), and prints cells as
mean ± std over seeds with the run count, the best cell per column marked. Writes
Markdown, LaTeX (booktabs) and CSV, and PNG plots of accuracy vs size and vs latency
with the Pareto front marked. Runs from a paper preset carry the paper's numbers in
their config (``paper:``); the report prints them beside ours.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from compresslab.track.sweep import collect_job_results

#: Metrics where smaller is better (everything else: larger is better).
LOWER_IS_BETTER = {"size_bytes", "params", "params_nonzero", "macs", "latency_ms_b1", "latency_ms_bN",
                   "latency_ms_b1_p90", "train_time_s"}


def _dotted(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def record_value(record: dict, key: str) -> Any:
    """A grouping key's value: an axis name (``distill``), a dotted path into the config, or
    several of these joined by ``+`` (``distill+quant`` -> ``kd/ptq_int8``)."""
    if "+" in key:
        return "/".join(str(record_value(record, part)) for part in key.split("+"))
    axes = record.get("axes") or {}
    if key in axes:
        return axes[key]
    return _dotted(record.get("config") or {}, key)


#: Figures that come from the clock (the rest — sizes, MACs, accuracies — are exact).
LATENCY_METRICS = {"latency_ms_b1", "latency_ms_bN", "latency_ms_b1_p90", "latency_ms_bN_p90", "speedup",
                   "speedup_b1", "speedup_vs_expected"}


def student_figures(record: dict) -> tuple[dict, str | None]:
    """The student's metrics, with its timed figures taken from the sweep-level measurement
    (``measured_together``, written by ``compresslab-measure``) when the run has one; and
    which source the timed figures came from (``measured_together``, ``per_job`` or None)."""
    student = dict(record.get("student") or {})
    together = (record.get("measured_together") or {}).get("student")
    if together:
        student.update({k: v for k, v in together.items() if k != "model_key"})
        if student.get("expected_speedup_macs") and student.get("speedup"):
            student["speedup_vs_expected"] = student["speedup"] / student["expected_speedup_macs"]
        return student, "measured_together"
    return student, ("per_job" if student.get("latency_ms_bN") is not None else None)


def records_to_frame(records: Iterable[dict], keys: Sequence[str]) -> pd.DataFrame:
    """One row per completed run: the grouping keys, and the student's (and teacher's) metrics;
    ``latency_source`` says where the timed figures came from (:func:`student_figures`)."""
    rows = []
    for r in records:
        if r.get("status") != "completed":
            continue
        row = {k: str(record_value(r, k)) for k in keys}
        row["seed"] = (r.get("axes") or {}).get("seed")
        student, source = student_figures(r)
        row.update({k: v for k, v in student.items() if isinstance(v, (int, float))})
        for key in ("speedup", "speedup_b1"):
            ci = student.get(f"{key}_ci")
            if isinstance(ci, list) and len(ci) == 2:
                row[f"{key}_ci_lo"], row[f"{key}_ci_hi"] = ci
        row["latency_unreliable_short"] = student.get("latency_unreliable_short") or student.get(
            "latency_unreliable_reason")
        row["latency_source"] = source
        row["latency_session"] = ((r.get("measured_together") or {}).get("session") or {}).get("id")
        row["teacher_acc_top1"] = (r.get("teacher") or {}).get("acc_top1")
        rows.append(row)
    return pd.DataFrame(rows)


def latency_source_line(frame: pd.DataFrame) -> str | None:
    """Which timed figures a report used, in words (None when no run has any)."""
    if "latency_source" not in frame or frame["latency_source"].isna().all():
        return None
    together = frame[frame["latency_source"] == "measured_together"]
    per_job = int((frame["latency_source"] == "per_job").sum())
    parts = []
    if len(together):
        sessions = sorted(set(together["latency_session"].dropna()))
        parts.append(f"{len(together)} runs measured together in one process by compresslab-measure "
                     f"(session {', '.join(sessions)}): comparable across runs")
    if per_job:
        parts.append(f"{per_job} runs measured per job (each in its own process at its own time: their speed-ups "
                     "compare within a job, their milliseconds not across jobs)")
    return "latency figures: " + "; ".join(parts)


def cell_notes(frame: pd.DataFrame, rows: str, cols: str | None, metric: str, index, columns) -> pd.DataFrame:
    """Text after a cell's number: the speed-up's 5-95% interval (single-run cells), a flag
    for figures the noise gate did not trust, and a warning where the measured speed-up is far
    below what the MACs ratio predicts."""
    notes = pd.DataFrame("", index=index, columns=columns)
    if metric not in LATENCY_METRICS:
        return notes
    keys = [rows] + ([cols] if cols else [])
    for group, part in frame.groupby(keys):
        group = group if isinstance(group, tuple) else (group,)
        r, c = group[0], (group[1] if cols else metric)
        text = []
        lo, hi = f"{metric}_ci_lo", f"{metric}_ci_hi"
        if len(part) == 1 and lo in part and not pd.isna(part[lo].iloc[0]):
            text.append(f"[{part[lo].iloc[0]:.2f}-{part[hi].iloc[0]:.2f}]")
        if "latency_reliable" in part and (part["latency_reliable"] == False).any():  # noqa: E712
            why = part.loc[part["latency_reliable"] == False, "latency_unreliable_short"].dropna()  # noqa: E712
            text.append(f"(unreliable: {why.iloc[0] if len(why) else 'see results.json'})")
        if metric == "speedup" and "expected_speedup_macs" in part:
            expected, measured = part["expected_speedup_macs"].mean(), part[metric].mean()
            if expected and expected > 1.5 and measured < 0.5 * expected:
                text.append(f"(MACs predict {expected:.2f}x)")
        if r in notes.index and c in notes.columns:
            notes.at[r, c] = " ".join(text)
    return notes


def aggregate(frame: pd.DataFrame, rows: str, cols: str | None, metric: str) -> pd.DataFrame:
    """mean, std (ddof=1; 0 for one run) and n per (row, col) cell."""
    keys = [rows] + ([cols] if cols else [])
    grouped = frame.groupby(keys)[metric].agg(["mean", "std", "count"]).reset_index()
    grouped["std"] = grouped["std"].fillna(0.0)
    return grouped


def _best_mask(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    lower = metric in LOWER_IS_BETTER
    best = table.min() if lower else table.max()
    return table.eq(best, axis=1)


def pivot(frame: pd.DataFrame, rows: str, cols: str | None, metric: str):
    """(mean table, std table, count table, best-per-column mask) with rows × cols."""
    agg = aggregate(frame, rows, cols, metric)
    col = cols or "_all"
    if not cols:
        agg[col] = metric
    row_order = baseline_first(frame[rows].tolist())
    col_order = baseline_first(frame[cols].tolist()) if cols else [metric]
    mean, std, count = (agg.pivot(index=rows, columns=col, values=v).reindex(index=row_order, columns=col_order)
                        for v in ("mean", "std", "count"))
    return mean, std, count, _best_mask(mean, metric)


def baseline_first(labels: Sequence[str]) -> list[str]:
    """Distinct labels, those with fewer non-``none`` parts first (the uncompressed baseline
    ``none`` / ``none/none`` leads), otherwise in order of first appearance (the sweep's order)."""
    seen = list(dict.fromkeys(labels))
    return sorted(seen, key=lambda label: (sum(part != "none" for part in str(label).split("/")),
                                           seen.index(label)))


def _scale(metric: str) -> float:
    return 100.0 if metric.startswith("acc") else 1.0


def _cell(mean: float, std: float, n: float, metric: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    s = _scale(metric)
    return f"{mean * s:.2f} ± {std * s:.2f} ({int(n)})"


def to_markdown(mean, std, count, best, metric: str, rows: str, notes: pd.DataFrame | None = None) -> str:
    """Markdown table, best per column in bold, each cell followed by its note (:func:`cell_notes`)."""
    header = f"| {rows} | " + " | ".join(str(c) for c in mean.columns) + " |"
    lines = [header, "|" + "---|" * (len(mean.columns) + 1)]
    for idx in mean.index:
        cells = []
        for c in mean.columns:
            text = _cell(mean.at[idx, c], std.at[idx, c], count.at[idx, c] if not pd.isna(count.at[idx, c]) else 0, metric)
            note = notes.at[idx, c] if notes is not None else ""
            cells.append((f"**{text}**" if best.at[idx, c] else text) + (f" {note}" if note else ""))
        lines.append(f"| {idx} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_latex(mean, std, count, best, metric: str, rows: str, notes: pd.DataFrame | None = None) -> str:
    """LaTeX booktabs tabular, best per column in bold, notes after the number."""
    esc = lambda s: str(s).replace("_", r"\_")  # noqa: E731
    lines = [r"\begin{tabular}{l" + "r" * len(mean.columns) + "}", r"\toprule",
             esc(rows) + " & " + " & ".join(esc(c) for c in mean.columns) + r" \\", r"\midrule"]
    for idx in mean.index:
        cells = []
        for c in mean.columns:
            n = count.at[idx, c] if not pd.isna(count.at[idx, c]) else 0
            text = _cell(mean.at[idx, c], std.at[idx, c], n, metric).replace("±", r"$\pm$")
            note = esc(notes.at[idx, c]) if notes is not None and notes.at[idx, c] else ""
            cells.append((rf"\textbf{{{text}}}" if best.at[idx, c] else text) + (f" {note}" if note else ""))
        lines.append(esc(idx) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def to_csv_frame(frame: pd.DataFrame, rows: str, cols: str | None, metric: str) -> pd.DataFrame:
    """Long-form CSV: one line per cell with mean, std, n and whether it is best in its column."""
    agg = aggregate(frame, rows, cols, metric)
    lower = metric in LOWER_IS_BETTER
    group = agg.groupby(cols)["mean"] if cols else agg["mean"]
    best = group.transform("min" if lower else "max") if cols else (agg["mean"].min() if lower else agg["mean"].max())
    agg["best_in_column"] = agg["mean"] == best
    agg.insert(0, "metric", metric)
    return agg


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when x is minimized and y (accuracy) maximized."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def plot_tradeoffs(frame: pd.DataFrame, keys: Sequence[str], out_dir: Path) -> list[Path]:
    """PNG plots of accuracy vs size and accuracy vs speed-up (means per group; the speed-up
    with its 5-95% interval as error bars, since it is what compares across jobs, not raw
    milliseconds), the Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cols = [c for c in ("acc_top1", "size_bytes", "speedup", "speedup_ci_lo", "speedup_ci_hi") if c in frame]
    grouped = frame.groupby(list(keys))
    means = grouped[cols].mean().reset_index()
    if "speedup_ci_lo" in frame:  # widest interval over the group's runs
        means["speedup_ci_lo"] = grouped["speedup_ci_lo"].min().values
        means["speedup_ci_hi"] = grouped["speedup_ci_hi"].max().values
    labels = [" ".join(str(v) for v in row) for row in means[list(keys)].itertuples(index=False)]
    plots = [("size_bytes", "artifact size (bytes, log)", "acc_vs_size.png", True)]
    if "speedup" in means and means["speedup"].notna().any():
        source = latency_source_line(frame) or ""
        label = "speed-up at batch N vs the dense fp32 reference (5-95% interval)"
        plots.append(("speedup", label + ("\n(measured together)" if "together" in source else ""),
                      "acc_vs_speedup.png", False))
    for x_key, x_label, name, minimize in plots:
        data = means[means[x_key].notna()]
        pts = list(zip(data[x_key] if minimize else -data[x_key], data["acc_top1"]))
        front = pareto_front(pts)
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        xs = list(data[x_key])
        if x_key == "speedup" and "speedup_ci_lo" in data:
            err = [list((data["speedup"] - data["speedup_ci_lo"]).clip(lower=0)),
                   list((data["speedup_ci_hi"] - data["speedup"]).clip(lower=0))]
            ax.errorbar(xs, data["acc_top1"], xerr=err, fmt="o", color="tab:blue", capsize=3,
                        label="runs (mean over seeds)")
        else:
            ax.scatter(xs, data["acc_top1"], color="tab:blue", label="runs (mean over seeds)")
        fp = sorted((xs[i], pts[i][1]) for i in front)
        ax.plot(*zip(*fp), color="tab:red", marker="o", fillstyle="none", markersize=12, label="Pareto front")
        for x, y, label in zip(xs, data["acc_top1"], [labels[i] for i in data.index]):
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("test top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


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
                s = _scale(metric)
                ours_txt = "no run" if ours is None or pd.isna(ours) else f"{ours * s:.2f}"
                lines.append(f"  {metric:10s} {key:32s} paper {float(value) * s:7.2f}   ours {ours_txt}")
    return lines


def load_wandb_records(project: str) -> list[dict]:
    """Records rebuilt from a W&B project (``entity/project``) through the public API (needs network)."""
    import wandb

    records = []
    for run in wandb.Api().runs(project):
        summary = dict(run.summary)
        rec: dict[str, Any] = {"status": summary.get("status", "completed" if run.state == "finished" else run.state),
                               "config": dict(run.config), "axes": {}}
        for row in ("teacher", "reference", "student"):
            rec[row] = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith(f"{row}/")}
        for axis in ("dataset", "teacher", "student", "distill", "prune", "quant", "lowrank"):
            rec["axes"][axis] = _dotted(rec["config"], f"{axis}.name")
        rec["axes"]["seed"] = rec["config"].get("seed")
        records.append(rec)
    return records


def build_report(records: list[dict], rows: str, cols: str | None, metrics: Sequence[str], out_dir: Path | None,
                 formats: Sequence[str] = ("md", "latex", "csv"), plots: bool = True) -> dict[str, Any]:
    """Tables (per metric) and plots for ``records``; returns the texts and written paths."""
    keys = [rows] + ([cols] if cols else [])
    frame = records_to_frame(records, keys)
    out: dict[str, Any] = {"markdown": [], "latex": [], "paths": [], "frame": frame, "paper": [],
                           "latency_source": None}
    if frame.empty:
        return out
    csv_parts = []
    for metric in metrics:
        if metric not in frame:
            raise SystemExit(f"metric '{metric}' not in results; available: {sorted(c for c in frame.columns)}")
        mean, std, count, best = pivot(frame, rows, cols, metric)
        notes = cell_notes(frame, rows, cols, metric, mean.index, mean.columns)
        out["markdown"].append(f"### {metric}\n\n" + to_markdown(mean, std, count, best, metric, rows, notes))
        out["latex"].append(f"% {metric}\n" + to_latex(mean, std, count, best, metric, rows, notes))
        csv_parts.append(to_csv_frame(frame, rows, cols, metric))
    out["paper"] = paper_rows(records, frame, rows, cols)
    out["latency_source"] = latency_source_line(frame)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if "md" in formats:
            p = out_dir / "report.md"
            source = [out["latency_source"]] if out["latency_source"] else []
            p.write_text("\n\n".join(out["markdown"] + source + (["```", *out["paper"], "```"] if out["paper"] else []))
                         + "\n")
            out["paths"].append(p)
        if "latex" in formats:
            p = out_dir / "report.tex"
            p.write_text("\n\n".join(out["latex"]) + "\n")
            out["paths"].append(p)
        if "csv" in formats:
            p = out_dir / "report.csv"
            pd.concat(csv_parts).to_csv(p, index=False)
            out["paths"].append(p)
        if plots and {"size_bytes", "acc_top1"} <= set(frame.columns):
            out["paths"] += plot_tradeoffs(frame, keys, out_dir)
    return out


def log_report_to_wandb(report: dict, project: str) -> None:
    """Log the long-form table and the plots to a W&B run (job_type=report)."""
    import wandb

    run = wandb.init(project=project, job_type="report")
    try:
        run.log({"ablation": wandb.Table(dataframe=report["frame"])})
        for path in report["paths"]:
            if path.suffix == ".png":
                run.log({path.stem: wandb.Image(str(path))})
    finally:
        wandb.finish()


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``compresslab-report``."""
    parser = argparse.ArgumentParser(prog="compresslab-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="run or sweep directories (searched for results.json)")
    parser.add_argument("--wandb-project", help="read runs from this W&B project (entity/project) instead")
    parser.add_argument("--rows", default="student", help="axis or dotted config key for table rows")
    parser.add_argument("--cols", default="distill", help="axis or config key for columns ('' for none)")
    parser.add_argument("--metric", action="append", dest="metrics",
                        help="metric(s) of the student to tabulate (default: acc_top1); e.g. size_ratio, speedup")
    parser.add_argument("--out", type=Path, help="output directory (default: the first path)")
    parser.add_argument("--format", action="append", dest="formats", choices=["md", "latex", "csv"])
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--log-wandb", metavar="PROJECT", help="also log the table and plots to this W&B project")
    args = parser.parse_args(argv)
    if args.wandb_project:
        records = load_wandb_records(args.wandb_project)
    else:
        if not args.paths:
            parser.error("give run/sweep directories, or --wandb-project")
        missing = [p for p in args.paths if not p.exists()]
        if missing:
            parser.error(f"no such directory: {', '.join(map(str, missing))}")
        records = [r for p in args.paths for r in collect_job_results(p)]
        for r in [r for r in records if r.get("status") == "unreadable"]:
            print(f"warning: skipped {r['_path']}: {r.get('error')}", file=sys.stderr)
        records = [r for r in records if r.get("status") != "unreadable"]
    failed = [r for r in records if r.get("status") != "completed"]
    out_dir = args.out or (args.paths[0] if args.paths else Path("outputs/report"))
    report = build_report(records, args.rows, args.cols or None, args.metrics or ["acc_top1"], out_dir,
                          args.formats or ("md", "latex", "csv"), plots=not args.no_plots)
    print(f"{len(records) - len(failed)} completed runs, {len(failed)} failed")
    for r in failed:
        print(f"  failed: {r.get('_path', r.get('run_dir'))}: {str(r.get('error'))[:160]}")
    if report["frame"].empty:
        raise SystemExit("no completed runs to tabulate")
    print("\n\n".join(report["markdown"]))
    if report["latency_source"]:
        print(report["latency_source"])
    for line in report["paper"]:
        print(line)
    for path in report["paths"]:
        print(f"wrote {path}")
    if args.log_wandb:
        log_report_to_wandb(report, args.log_wandb)


if __name__ == "__main__":
    main()
