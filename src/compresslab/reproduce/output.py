"""The suite's outputs: the terminal table, ``reproduce.json``, ``reproduce.md`` and one PNG per claim."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from compresslab.reproduce.claims import Claim


def fmt(x: float | None, std: float | None = None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{x:.{digits}f}"


def spread(std: float | None, seeds: Sequence) -> float | None:
    """The std to print beside a mean: none for a single seed (its 0 is no measured spread)."""
    return std if len(seeds) > 1 else None


def figure(claim: Claim, row: dict, path: Path) -> Path:
    """The claim's figure (``repro.figure``): ``kind: bars`` (metrics side by side, the paper's
    numbers as markers) or ``kind: lines`` (``series: {label: {x: metric}}`` with ``hlines``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = claim.figure or {"kind": "bars", "bars": [claim.headline]}
    metrics = row["metrics"]

    def ms(name):
        m = metrics.get(name) or {}
        return (m.get("mean") if m.get("mean") is not None else math.nan,
                m.get("std") if m.get("std") is not None else 0.0)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if spec.get("kind", "bars") == "bars":
        names = list(spec.get("bars") or [claim.headline])
        means, stds = zip(*(ms(n) for n in names))
        xs = range(len(names))
        ax.bar(xs, means, yerr=stds, capsize=4, color="#4C72B0", label=f"ours (mean ± std, {len(row['seeds'])} seeds)")
        paper = dict(spec.get("paper") or {})
        px = [i for i, n in enumerate(names) if n in paper]
        if px:
            ax.scatter(px, [float(paper[names[i]]) for i in px], marker="D", color="#C44E52", zorder=3, label="paper")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([str((spec.get("labels") or {}).get(n, n)) for n in names], rotation=15, ha="right",
                           fontsize=8)
    else:
        for label, points in dict(spec.get("series") or {}).items():
            xs = sorted(points, key=float)
            means, stds = zip(*(ms(points[x]) for x in xs))
            ax.errorbar([float(x) for x in xs], means, yerr=stds, marker="o", capsize=3, label=str(label))
        for label, name in dict(spec.get("hlines") or {}).items():
            mean, std = ms(name)
            if not math.isnan(mean):
                ax.axhline(mean, linestyle="--", color="gray")
                ax.text(ax.get_xlim()[0], mean, f" {label}", va="bottom", fontsize=8, color="gray")
        ax.set_xlabel(str(spec.get("xlabel", "")))
    ax.set_ylabel(str(spec.get("ylabel", claim.metrics[claim.headline].label)))
    ax.set_title(f"{claim.claim}: {row['verdict']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table_rows(rows: Sequence[dict]) -> list[list[str]]:
    return [[r["paper"], r["claim"], fmt(r["paper_value"]), fmt(r["ours_mean"], spread(r["ours_std"], r["seeds"])),
             r["verdict"]]
            for r in rows]


HEADER = ["paper", "claim", "paper number", "ours (mean ± std)", "verdict"]


def print_table(rows: Sequence[dict], wall_s: float | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    title = "compresslab-reproduce" + (f" · {wall_s / 60:.1f} min" if wall_s is not None else "")
    table = Table(title=title)
    for h in HEADER:
        table.add_column(h, justify="right" if "number" in h or "ours" in h else "left")
    for cells in table_rows(rows):
        table.add_row(*cells)
    Console().print(table)


def markdown(rows: Sequence[dict], wall_s: float | None, command: str) -> str:
    lines = ["# Reproductions", "", f"`{command}`" + (f" — wall time {wall_s / 60:.1f} min" if wall_s else ""), ""]
    lines += ["| " + " | ".join(HEADER) + " | metric |", "|" + "---|" * (len(HEADER) + 1)]
    for r, cells in zip(rows, table_rows(rows)):
        lines.append("| " + " | ".join(cells) + f" | {r['metric']} |")
    for r in rows:
        lines += ["", f"## {r['claim']} — {r['verdict']}", "", f"*{r['paper']}.* {r['statement']}", ""]
        if r.get("schedule"):
            lines += [f"Schedule: {r['schedule']}", ""]
        lines += ["| metric | ours (mean ± std) | per seed |", "|---|---|---|"]
        for m in r["metrics"].values():
            lines.append(f"| {m['label']} | {fmt(m['mean'], spread(m['std'], r['seeds']))} | "
                         f"{', '.join(f'{v:.2f}' for v in m['values'])} |")
        lines += ["", "Verdict rule (on the mean over seeds; all hold: reproduced, some: partly, none: not reproduced):", ""]
        for c in r["checks"]:
            lines.append(f"- `{c['check']}`: {fmt(c['mean'])} → {'holds' if c['holds'] else 'fails'}"
                         + (f" ({c['why']})" if c.get("why") else ""))
        if r.get("note"):
            lines += ["", r["note"].strip()]
        if r.get("errors"):
            lines += ["", "Failed jobs: " + "; ".join(r["errors"])]
        if r.get("figure"):
            lines += ["", f"![{r['claim']}]({Path(r['figure']).name})"]
    return "\n".join(lines) + "\n"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_outputs(out: Path, rows: list[dict], claims: dict[str, Claim], wall_s: float, command: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["figure"] = str(figure(claims[r["claim"]], r, out / f"{r['claim']}.png"))
    (out / "reproduce.json").write_text(json.dumps(_clean(rows), indent=2, default=str) + "\n")
    (out / "reproduce.md").write_text(markdown(rows, wall_s, command))
    return {"json": out / "reproduce.json", "md": out / "reproduce.md"}
