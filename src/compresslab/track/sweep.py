"""End-of-sweep summary: a Hydra callback that lists completed and failed jobs of a multirun."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compresslab.track.results import collect_job_results


def launched_job_dirs(config: DictConfig) -> list[Path]:
    """The directories of the jobs Hydra's basic sweeper launched, from the sweep's own
    overrides (its job list); [] for other sweepers, whose trial count the config doesn't fix."""
    hydra_cfg = config.hydra
    if "BasicSweeper" not in str(hydra_cfg.sweeper.get("_target_", "")):
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = list(hydra_cfg.overrides.task) + [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(arguments)
    n_jobs = sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    if OmegaConf.to_container(hydra_cfg.sweep, resolve=False).get("subdir") != "${hydra.job.num}":
        return []  # job dirs named otherwise: only the results files found and the jobs seen ending count
    return [Path(hydra_cfg.sweep.dir) / str(i) for i in range(n_jobs)]


def status_counts(records: list[dict]) -> dict[str, int]:
    """How many jobs completed, were pruned by a search's pruner (stopped early on purpose), or failed
    (anything else: failed, unreadable, still running)."""
    completed = sum(r.get("status") == "completed" for r in records)
    pruned = sum(r.get("status") == "pruned" for r in records)
    return {"completed": completed, "pruned": pruned, "failed": len(records) - completed - pruned}


def summary_table(records: list[dict], sweep_dir: Path) -> Table:
    """One row per job: directory, axes that vary, status, student accuracy or the error."""
    with_axes = [r.get("axes") for r in records if r.get("axes")]  # a config that didn't resolve has none
    axes_keys = sorted({k for axes in with_axes for k in axes})
    varying = [k for k in axes_keys if len({str(axes.get(k)) for axes in with_axes}) > 1]
    counts = status_counts(records)
    table = Table(title=f"sweep: {counts['completed']} completed, {counts['pruned']} pruned, {counts['failed']} failed")
    for col in ["job", *varying, "status", "student acc / error"]:
        table.add_column(col, overflow="fold")
    for r in records:
        job = Path(r["_path"]).parent.name
        detail = (f"{(r.get('student') or {}).get('acc_top1', float('nan')):.4f}" if r.get("status") == "completed"
                  else f"stopped early after epoch {r.get('pruned_at_epoch')}" if r.get("status") == "pruned"
                  else str(r.get("error") or "")[:120])
        axes = r.get("axes") or {}
        table.add_row(job, *[escape(str(axes.get(k, "?"))) for k in varying], str(r.get("status")),
                      escape(detail))
    return table


class SweepSummary(Callback):
    """Prints the completed/pruned/failed summary when a multirun ends; exits non-zero if a job failed
    (a trial a search's pruner stopped is not a failure)."""

    def __init__(self, fail_on_error: bool = True, report: dict | None = None) -> None:
        self.fail_on_error = fail_on_error
        self.report = dict(report or {})
        self.job_dirs: list[Path] = []  # jobs that ended in this process (the basic launcher's)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        hydra_cfg = getattr(job_return, "hydra_cfg", None)
        output_dir = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir") if hydra_cfg is not None else None
        if output_dir:
            self.job_dirs.append(Path(output_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        job_dirs = [*launched_job_dirs(config), *self.job_dirs]
        records = collect_job_results(sweep_dir, job_dirs)
        console = Console()
        if any(r.get("status") == "completed" and (r.get("student") or {}).get("latency_deferred")
               and "measured_together" not in r for r in records):
            records = self._measure_together(sweep_dir, job_dirs, console)
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
        failed = [r for r in records if r.get("status") not in ("completed", "pruned")]
        if failed and self.fail_on_error:
            raise SystemExit(f"{len(failed)} of {len(records)} sweep jobs failed (see the table above)")

    @staticmethod
    def _measure_together(sweep_dir: Path, job_dirs: list[Path], console: Console) -> list[dict]:
        """The jobs deferred their latency (``measure.defer``): time every job's artifacts
        together in one fresh process (``compresslab-measure``), then re-read the records."""
        from compresslab.measure.together import measure_in_subprocess

        console.print("jobs deferred their latency: measuring every job's artifacts together in one process "
                      f"(compresslab-measure {sweep_dir})", soft_wrap=True, highlight=False)
        code = measure_in_subprocess([sweep_dir])
        if code != 0:
            console.print(f"[red]compresslab-measure failed (exit {code}); the table has no latency[/red]")
        return collect_job_results(sweep_dir, job_dirs)

    def _print_report(self, records: list[dict], sweep_dir: Path, console: Console, spec: dict) -> None:
        """The ablation table(s) in the terminal, and report files + Pareto plots in the sweep dir
        (``spec``: rows, cols, metrics; from this callback's config or a paper preset's ``paper.report``)."""
        from compresslab.track.report import build_report

        metrics = list(spec.get("metrics") or ["acc_top1"])
        report = build_report(records, spec["rows"], spec.get("cols"), metrics, sweep_dir)
        for table in report["markdown"]:
            console.print(escape(table), soft_wrap=True, highlight=False)
        if report["latency_source"]:
            console.print(escape(report["latency_source"]), soft_wrap=True, highlight=False)
        for line in report["paper"]:
            console.print(escape(line), soft_wrap=True, highlight=False)
        for path in report["paths"]:
            console.print(f"wrote {path}", soft_wrap=True, highlight=False)
