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

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from compresslab.axes import AXES
from compresslab.measure.latency import TIMED_FIGURES

#: Metrics where smaller is better (everything else: larger is better). A dotted metric
#: (``backends.onnxruntime.latency_ms_bN``) is judged by its last part (:func:`base_metric`).
LOWER_IS_BETTER = {"size_bytes", "params", "params_nonzero", "macs", "latency_ms_b1", "latency_ms_bN",
                   "latency_ms_b1_p90", "latency_ms_bN_p90", "latency_ms_b1_iqr", "latency_ms_bN_iqr",
                   "train_time_s"}


def base_metric(metric: str) -> str:
    """What a metric measures: its last dotted part (``backends.onnxruntime.speedup`` -> ``speedup``)."""
    return str(metric).rsplit(".", 1)[-1]


def lower_is_better(metric: str) -> bool:
    return base_metric(metric) in LOWER_IS_BETTER


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


#: Figures that come from the clock (the rest — sizes, MACs, accuracies — are exact); a dotted
#: metric (``backends.onnxruntime.speedup``) by its last part.
LATENCY_METRICS = {"latency_ms_b1", "latency_ms_bN", "latency_ms_b1_p90", "latency_ms_bN_p90", "latency_ms_b1_iqr",
                   "latency_ms_bN_iqr", "speedup", "speedup_b1", "speedup_vs_expected", "deployed_speedup",
                   "deployed_speedup_b1"}

#: The student's exact figures that each backend has its own of besides the timed ones
#: (:data:`~compresslab.measure.latency.TIMED_FIGURES`): the file's accuracy in that backend and its size.
BACKEND_EXACT = ("acc_top1", "size_bytes")
#: Speed-ups with a 5-95% interval (``<key>_ci``), tabulated as ``<key>_ci_lo`` / ``<key>_ci_hi``.
CI_KEYS = ("speedup", "speedup_b1", "deployed_speedup", "deployed_speedup_b1")


def is_timed(metric: str) -> bool:
    return base_metric(metric) in LATENCY_METRICS


def _ci_columns(row: dict, prefix: str, figures: dict) -> None:
    for key in CI_KEYS:
        ci = figures.get(f"{key}_ci")
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            row[f"{prefix}{key}_ci_lo"], row[f"{prefix}{key}_ci_hi"] = ci


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
    per_job = dict(record.get("student") or {})
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
        for metric in metrics:
            value = _dotted(student, metric) if "." in metric and metric not in row else None
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
    values = frame[keys].assign(**{metric: pd.to_numeric(frame[metric], errors="coerce")})
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


def _scale(metric: str) -> float:
    return 100.0 if base_metric(metric).startswith("acc") else 1.0


def _cell(mean: float, std: float, n: float, metric: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    s = _scale(metric)
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


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when x is minimized and y (accuracy) maximized."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def plot_tradeoffs(frame: pd.DataFrame, keys: Sequence[str], out_dir: Path, backend: str | None = None) -> list[Path]:
    """PNG plots of accuracy vs size and accuracy vs speed-up (means per group; the speed-up
    with its 5-95% interval as error bars, since it is what compares across jobs, not raw
    milliseconds), the Pareto front marked. With ``backend`` the figures are that backend's
    (the frame's, see :func:`student_figures`), the axes say so and the files are
    ``acc_vs_size_<backend>.png`` / ``acc_vs_speedup_<backend>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cols = [c for c in ("acc_top1", "size_bytes", "speedup", "speedup_ci_lo", "speedup_ci_hi") if c in frame]
    numeric = frame[list(keys)].join(frame[cols].apply(pd.to_numeric, errors="coerce"))
    grouped = numeric.groupby(list(keys))
    means = grouped[cols].mean().reset_index()
    if "speedup_ci_lo" in frame:  # widest interval over the group's runs
        means["speedup_ci_lo"] = grouped["speedup_ci_lo"].min().values
        means["speedup_ci_hi"] = grouped["speedup_ci_hi"].max().values
    labels = [" ".join(str(v) for v in row) for row in means[list(keys)].itertuples(index=False)]
    suffix = f"_{backend}" if backend else ""
    size_label = f"{backend} file size (bytes, log)" if backend else "artifact size (bytes, log)"
    plots = [("size_bytes", size_label, f"acc_vs_size{suffix}.png", True)]
    if "speedup" in means and means["speedup"].notna().any():
        source = latency_source_line(frame) or ""
        label = "speed-up at batch N vs the dense fp32 reference (5-95% interval)"
        if backend:
            label = f"speed-up at batch N in {backend} vs the fp32 reference in {backend} (5-95% interval)"
        plots.append(("speedup", label + ("\n(measured together)" if "together" in source else ""),
                      f"acc_vs_speedup{suffix}.png", False))
    for x_key, x_label, name, minimize in plots:
        if x_key not in means or "acc_top1" not in means:
            continue
        data = means[means[x_key].notna() & means["acc_top1"].notna()]
        if data.empty:
            continue
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
        ax.set_ylabel(f"test top-1 accuracy in {backend}" if backend else "test top-1 accuracy")
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


def _plain(value: Any) -> Any:
    """W&B summary values as plain Python: nested summary dicts as dicts, lists as lists."""
    if isinstance(value, (str, bytes)):
        return value
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):
        return {str(k): _plain(value[k]) for k in value.keys()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"backends/onnxruntime/speedup": 2.0, "acc_top1": 0.9}`` -> ``{"backends": {"onnxruntime":
    {"speedup": 2.0}}, "acc_top1": 0.9}`` (a key's value that is itself a dict merges in)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = _merge(node[leaf], value) if isinstance(value, dict) and isinstance(node.get(leaf), dict) else value
    return out


def _merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, nested dicts merged key by key (``extra`` wins on leaves)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


#: The record's blocks that a W&B summary carries as ``<block>/<key>`` (``<key>`` may go on with
#: ``/``: ``student/backends/onnxruntime/speedup``, or be a nested dict: ``student/backends``).
WANDB_BLOCKS = ("teacher", "reference", "student", "measured_together")


def load_wandb_records(project: str) -> list[dict]:
    """Records rebuilt from a W&B project (``entity/project``) through the public API (needs network):
    the same nested blocks as results.json (``student.backends.<backend>...``,
    ``measured_together``) from the summary's ``<block>/...`` keys, so ``--backend`` and dotted
    metrics read them as they read results.json."""
    import wandb

    records = []
    for run in wandb.Api().runs(project):
        summary = {str(k): _plain(v) for k, v in dict(run.summary).items()}
        rec: dict[str, Any] = {"status": summary.get("status", "completed" if run.state == "finished" else run.state),
                               "config": dict(run.config), "axes": {}, "run_dir": getattr(run, "name", None)}
        for row in WANDB_BLOCKS:
            block = _nest({k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith(f"{row}/")})
            if block or row != "measured_together":
                rec[row] = block
        for axis in AXES:
            rec["axes"][axis] = _dotted(rec["config"], f"{axis}.name")
        rec["axes"]["seed"] = rec["config"].get("seed")
        records.append(rec)
    return records


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
