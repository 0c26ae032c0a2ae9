"""End-of-sweep summary: a Hydra callback that lists completed and failed jobs of a multirun."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def collect_job_results(sweep_dir: Path) -> list[dict]:
    """Every ``results.json`` under ``sweep_dir`` (one per job), in job order (``2/`` before ``10/``)."""
    records = []
    for path in sorted(Path(sweep_dir).rglob("results.json"), key=_natural_key):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            record = {"status": "unreadable", "error": str(exc)}
        record["_path"] = str(path)
        records.append(record)
    return records


def _natural_key(path: Path) -> tuple:
    """Sort key comparing numeric path parts as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def summary_table(records: list[dict], sweep_dir: Path) -> Table:
    """One row per job: directory, axes that vary, status, student accuracy or the error."""
    axes_keys = sorted({k for r in records for k in (r.get("axes") or {})})
    varying = [k for k in axes_keys if len({str((r.get("axes") or {}).get(k)) for r in records}) > 1]
    n_ok = sum(r.get("status") == "completed" for r in records)
    table = Table(title=f"sweep: {n_ok} completed, {len(records) - n_ok} failed")
    for col in ["job", *varying, "status", "student acc / error"]:
        table.add_column(col, overflow="fold")
    for r in records:
        job = Path(r["_path"]).parent.name
        detail = (f"{(r.get('student') or {}).get('acc_top1', float('nan')):.4f}" if r.get("status") == "completed"
                  else str(r.get("error") or "")[:120])
        table.add_row(job, *[escape(str((r.get("axes") or {}).get(k))) for k in varying], str(r.get("status")),
                      escape(detail))
    return table


class SweepSummary(Callback):
    """Prints the completed/failed summary when a multirun ends; exits non-zero if a job failed."""

    def __init__(self, fail_on_error: bool = True, report: dict | None = None) -> None:
        self.fail_on_error = fail_on_error
        self.report = dict(report or {})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = collect_job_results(sweep_dir)
        console = Console()
        console.print(summary_table(records, sweep_dir))
        best = sweep_dir / "optimization_results.yaml"  # written by the Optuna sweeper
        if best.exists():
            console.print(f"best trial ({best.name}):\n{escape(best.read_text())}", soft_wrap=True, highlight=False)
        report = self.report or next((((r.get("config") or {}).get("paper") or {}).get("report")
                                      for r in records if ((r.get("config") or {}).get("paper") or {}).get("report")),
                                     None)
        if report and report.get("rows") and any(r.get("status") == "completed" for r in records):
            self._print_report(records, sweep_dir, console, report)
        console.print(f"sweep dir: {sweep_dir}", soft_wrap=True, highlight=False)
        failed = [r for r in records if r.get("status") != "completed"]
        if failed and self.fail_on_error:
            raise SystemExit(f"{len(failed)} of {len(records)} sweep jobs failed (see the table above)")

    def _print_report(self, records: list[dict], sweep_dir: Path, console: Console, spec: dict) -> None:
        """The ablation table(s) in the terminal, and report files + Pareto plots in the sweep dir
        (``spec``: rows, cols, metrics; from this callback's config or a paper preset's ``paper.report``)."""
        from compresslab.track.report import build_report

        metrics = list(spec.get("metrics") or ["acc_top1"])
        report = build_report(records, spec["rows"], spec.get("cols"), metrics, sweep_dir)
        for table in report["markdown"]:
            console.print(escape(table), soft_wrap=True, highlight=False)
        for line in report["paper"]:
            console.print(escape(line), soft_wrap=True, highlight=False)
        for path in report["paths"]:
            console.print(f"wrote {path}", soft_wrap=True, highlight=False)
