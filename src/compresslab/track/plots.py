"""Accuracy-vs-size and accuracy-vs-latency plots with the Pareto front marked."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pandas as pd

from compresslab.track.tables import latency_source_line


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
