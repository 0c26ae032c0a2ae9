"""The end-of-run terminal table (rich) comparing teacher, reference and student."""

from __future__ import annotations

from typing import Any, Mapping

from rich.console import Console
from rich.table import Table

_COLUMNS = [
    ("acc_top1", "test acc", "{:.4f}"),
    ("acc_top1_last", "acc (last ep)", "{:.4f}"),
    ("params", "params", "{:,}"),
    ("params_nonzero", "nonzero", "{:,}"),
    ("macs", "MACs", "{:,}"),
    ("size_bytes", "size (B)", "{:,}"),
    ("size_ratio", "size ratio", "{:.2f}x"),
    ("latency_ms_b1", "lat b1 (ms)", "{:.3f}"),
    ("latency_ms_bN", "lat bN (ms)", "{:.3f}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("train_time_s", "train (s)", "{:.1f}"),
]


def _fmt(value: Any, pattern: str) -> str:
    if value is None:
        return "-"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def print_summary(record: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the comparison table and the run directory."""
    console = console or Console()
    table = Table(title=f"compresslab · {record.get('status')} · " +
                  " ".join(f"{k}={v}" for k, v in (record.get("axes") or {}).items()))
    table.add_column("model")
    for _, title, _ in _COLUMNS:
        table.add_column(title, justify="right")
    for row in ("teacher", "reference", "student"):
        metrics = record.get(row)
        if metrics:
            table.add_row(row, *[_fmt(metrics.get(k), p) for k, _, p in _COLUMNS])
    console.print(table)
    if record.get("error"):
        console.print(f"[red]error:[/red] {record['error']}")
    console.print(f"run dir: {record.get('run_dir')}")
