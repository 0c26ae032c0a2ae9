"""Ablation tables: cells as mean ± std (n) per (row, column) group, best per column marked, in Markdown, LaTeX and CSV."""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from compresslab.track.metrics import base_metric, is_timed, lower_is_better


def cell_notes(frame: pd.DataFrame, rows: str, cols: str | None, metric: str, index, columns) -> pd.DataFrame:
    """Text after a cell's number: the speed-up's 5-95% interval (single-run cells), a flag
    for figures the noise gate did not trust, and a warning where the measured speed-up is far
    below what the MACs ratio predicts."""
    notes = pd.DataFrame("", index=index, columns=columns)
    if not is_timed(metric):
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
        if base_metric(metric) == "speedup" and "expected_speedup_macs" in part:
            expected, measured = part["expected_speedup_macs"].mean(), part[metric].mean()
            if expected and expected > 1.5 and measured < 0.5 * expected:
                text.append(f"(MACs predict {expected:.2f}x)")
        if base_metric(metric) in ("deployed_speedup", "deployed_speedup_b1"):
            tag = "deployed_backend" + ("_b1" if metric.endswith("_b1") else "")
            used = sorted(set(part[tag].dropna())) if tag in part else []
            if used:
                text.append(f"({', '.join(used)})")
        if r in notes.index and c in notes.columns:
            notes.at[r, c] = " ".join(text)
    return notes


def aggregate(frame: pd.DataFrame, rows: str, cols: str | None, metric: str) -> pd.DataFrame:
    """mean, std (ddof=1; 0 for one run) and n per (row, col) cell."""
    keys = [rows] + ([cols] if cols else [])
    numbers = pd.to_numeric(frame[metric], errors="coerce")  # never an inf cell, never bolded as best
    values = frame[keys].assign(**{metric: numbers.where(numbers.abs() != math.inf)})
    grouped = values.groupby(keys)[metric].agg(["mean", "std", "count"]).reset_index()
    grouped["std"] = grouped["std"].fillna(0.0)
    return grouped


def _best_mask(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    lower = lower_is_better(metric)
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


def display_scale(metric: str) -> float:
    """The factor a metric is shown with (accuracies in percent)."""
    return 100.0 if base_metric(metric).startswith("acc") else 1.0


def _cell(mean: float, std: float, n: float, metric: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    s = display_scale(metric)
    # sub-millisecond latencies (ONNX Runtime at batch 1: 0.05 ms) need a third decimal to tell runs apart
    d = 3 if base_metric(metric).startswith("latency_ms") and abs(mean) < 1 else 2
    return f"{mean * s:.{d}f} ± {std * s:.{d}f} ({int(n)})"


def _rows_label(rows: str, backend: str | None) -> str:
    return f"{rows} (backend {backend})" if backend else rows


def to_markdown(mean, std, count, best, metric: str, rows: str, notes: pd.DataFrame | None = None,
                backend: str | None = None) -> str:
    """Markdown table, best per column in bold, each cell followed by its note (:func:`cell_notes`);
    with ``backend`` the header says whose figures these are."""
    header = f"| {_rows_label(rows, backend)} | " + " | ".join(str(c) for c in mean.columns) + " |"
    lines = [header, "|" + "---|" * (len(mean.columns) + 1)]
    for idx in mean.index:
        cells = []
        for c in mean.columns:
            text = _cell(mean.at[idx, c], std.at[idx, c], count.at[idx, c] if not pd.isna(count.at[idx, c]) else 0, metric)
            note = notes.at[idx, c] if notes is not None else ""
            cells.append((f"**{text}**" if best.at[idx, c] else text) + (f" {note}" if note else ""))
        lines.append(f"| {idx} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_latex(mean, std, count, best, metric: str, rows: str, notes: pd.DataFrame | None = None,
             backend: str | None = None) -> str:
    """LaTeX booktabs tabular, best per column in bold, notes after the number."""
    esc = lambda s: str(s).replace("_", r"\_")  # noqa: E731
    lines = [r"\begin{tabular}{l" + "r" * len(mean.columns) + "}", r"\toprule",
             esc(_rows_label(rows, backend)) + " & " + " & ".join(esc(c) for c in mean.columns) + r" \\", r"\midrule"]
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


def to_csv_frame(frame: pd.DataFrame, rows: str, cols: str | None, metric: str,
                 backend: str | None = None) -> pd.DataFrame:
    """Long-form CSV: one line per cell with mean, std, n and whether it is best in its column
    (and, with ``backend``, a ``backend`` column after ``metric``)."""
    agg = aggregate(frame, rows, cols, metric)
    lower = lower_is_better(metric)
    group = agg.groupby(cols)["mean"] if cols else agg["mean"]
    best = group.transform("min" if lower else "max") if cols else (agg["mean"].min() if lower else agg["mean"].max())
    agg["best_in_column"] = agg["mean"] == best
    if backend:
        agg.insert(0, "backend", backend)
    agg.insert(0, "metric", metric)
    return agg


def latency_source_line(frame: pd.DataFrame) -> str | None:
    """Which timed figures a report used, in words (None when no run has any)."""
    if "latency_source" not in frame or frame["latency_source"].isna().all():
        return None
    backend = frame["backend"].dropna().iloc[0] if "backend" in frame and frame["backend"].notna().any() else None
    together = frame[frame["latency_source"] == "measured_together"]
    per_job = int((frame["latency_source"] == "per_job").sum())
    parts = []
    if len(together):
        sessions = sorted(set(together["latency_session"].dropna()))
        if len(sessions) <= 1:
            parts.append(f"{len(together)} runs measured together in one process by compresslab-measure "
                         f"(session {', '.join(sessions)}): comparable across runs")
        else:  # several compresslab-measure sessions: milliseconds compare only within one
            counts = together["latency_session"].value_counts()
            parts.append(f"{len(together)} runs measured by compresslab-measure in {len(sessions)} separate sessions ("
                         + ", ".join(f"{sid}: {int(counts[sid])} runs" for sid in sessions)
                         + "): speed-ups compare across runs, milliseconds only within a session "
                         "(compresslab-measure <all dirs> times them in one)")
    if per_job:
        parts.append(f"{per_job} runs measured per job (each in its own process at its own time: their speed-ups "
                     "compare within a job, their milliseconds not across jobs)")
    return f"latency figures{f' (backend {backend})' if backend else ''}: " + "; ".join(parts)
