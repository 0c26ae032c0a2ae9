"""The end-of-run terminal table (rich) comparing teacher, reference and student."""

from __future__ import annotations

from typing import Any, Mapping

from rich.console import Console
from rich.markup import escape
from rich.table import Table

_COLUMNS = [  # a key no model has (a language model's, an image model's) leaves no row
    ("perplexity", "test perplexity", "{:.3f}"),
    ("acc_top1", "test acc", "{:.4f}"),
    ("acc_top1_last", "acc (last ep)", "{:.4f}"),
    ("params", "params", "{:,}"),
    ("params_nonzero", "nonzero", "{:,}"),
    ("macs", "MACs", "{:,}"),
    ("size_bytes", "size (B)", "{:,}"),
    ("size_ratio", "size ratio", "{:.2f}x"),
    ("latency_ms_b1", "lat b1 (ms)", "{:.3f}"),
    ("latency_ms_bN", "lat bN (ms)", "{:.3f}"),
    ("speedup_b1", "speed-up b1", "{:.2f}x"),
    ("speedup", "speed-up bN", "{:.2f}x"),
    ("prefill_tokens_per_s_b1", "prefill tok/s b1", "{:,.0f}"),
    ("prefill_tokens_per_s_bN", "prefill tok/s bN", "{:,.0f}"),
    ("decode_ms_per_token_b1", "decode ms/tok b1", "{:.3f}"),
    ("decode_ms_per_token_bN", "decode ms/tok bN", "{:.3f}"),
    ("expected_speedup_macs", "MACs ratio", "{:.2f}x"),
    ("train_time_s", "train (s)", "{:.1f}"),
]


def _fmt(value: Any, pattern: str) -> str:
    if value is None:
        return "-"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


#: Cells whose figure comes from the clock: marked when the noise gate did not trust it.
_TIMED = {"latency_ms_b1", "latency_ms_bN", "speedup_b1", "speedup"}
#: a language model's timed figures (marked the same way; no "deferred" row for models without them)
_LM_TIMED = {"prefill_tokens_per_s_b1", "prefill_tokens_per_s_bN", "decode_ms_per_token_b1", "decode_ms_per_token_bN"}


def cell(row: Mapping[str, Any], key: str, pattern: str) -> str:
    """One cell of a model's column: a speed-up with its interval, a timed figure the noise
    gate flagged as ``<value> (unreliable: <why>)``, a deferred one as ``deferred``."""
    if key in _TIMED and row.get("latency_deferred") and row.get(key) is None:
        return "deferred"
    text = _fmt(row.get(key), pattern)
    ci = row.get(f"{key}_ci")
    if key.startswith("speedup") and isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        text += f" [{ci[0]:.2f}-{ci[1]:.2f}]"
    if key in _TIMED | _LM_TIMED and row.get(key) is not None and row.get("latency_reliable") is False:
        text += f" (unreliable: {row.get('latency_unreliable_short') or row.get('latency_unreliable_reason')})"
    return text


def print_summary(record: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the comparison table (one column per model, so it fits a narrow terminal) and the run dir."""
    console = console or Console()
    axes = " ".join(f"{k}={v}" for k, v in (record.get("axes") or {}).items())
    table = Table(title=f"compresslab · {record.get('status')}\n{axes}")
    rows = [r for r in ("teacher", "reference", "student") if record.get(r)]
    table.add_column("metric")
    for row in rows:
        table.add_column(row, justify="right")
    for key, title, pattern in _COLUMNS:
        values = [record[r].get(key) for r in rows]
        if any(v is not None for v in values) or (key in _TIMED and any(record[r].get("latency_deferred") for r in rows)):
            table.add_row(title, *[cell(record[r], key, pattern) for r in rows])
    if rows:
        console.print(table)
    if record.get("error"):
        console.print(f"[red]error:[/red] {escape(str(record['error']))}")
    console.print(f"results: {record.get('run_dir')}/results.json", soft_wrap=True, highlight=False)
