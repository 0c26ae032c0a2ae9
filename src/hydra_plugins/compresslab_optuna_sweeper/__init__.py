"""compresslab's Optuna sweeper for Hydra (``hydra/sweeper=optuna``, ``optuna_nsga2``, ``optuna_motpe``).

A Hydra sweeper plugin rather than a separate ``compresslab-search`` command: it is one more
``hydra/sweeper`` choice of the ``compresslab -m`` users already run, so every Hydra launcher (the
basic one, submitit local/SLURM, compresslab's SLURM launcher) runs the trials, and the end-of-sweep
callbacks (summary, deferred latency) work as for any multirun. (hydra-optuna-sweeper, the official
plugin, pins optuna < 3 and is single-objective under a penalty; this one is written for Optuna >= 4.)

Each batch of ``n_jobs`` trials is asked from the study, launched as jobs with the sampled overrides
plus ``+search.*`` (storage, study, companion trial number, monitored metric), and told the values the
``objectives`` paths hold in each job's results.json -- or that the job was pruned or failed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import optuna
import yaml
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from compresslab.search.space import search_space
from compresslab.search.study import (STUDY_FILE, create_studies, objective_values, parse_objectives,
                                      storage_url)

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    """Multi- or single-objective Optuna search over Hydra overrides, with pruning and a persistent study."""

    def __init__(self, objectives: DictConfig, sampler: DictConfig, pruner: DictConfig, study_name: str = "compresslab",
                 storage: str | None = None, n_trials: int = 20, n_jobs: int = 1, monitor: str = "val/acc",
                 monitor_direction: str = "maximize", params: DictConfig | None = None,
                 constraints: DictConfig | None = None) -> None:
        self.paths, self.directions = parse_objectives(OmegaConf.to_container(objectives) if
                                                       isinstance(objectives, DictConfig) else dict(objectives))
        self.constraints = {str(k): float(v) for k, v in (constraints or {}).items()}
        # budgets: a sampler that supports constraints (TPE, NSGA-II) prefers trials within them
        extra = {"constraints_func": trial_constraints} if self.constraints else {}
        self.sampler, self.pruner = instantiate(sampler, **extra), instantiate(pruner)
        self.study_name, self.storage = str(study_name), storage
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        if self.n_trials < 1 or self.n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials} and n_jobs={n_jobs} must be >= 1")
        self.monitor, self.monitor_direction = str(monitor), str(monitor_direction)
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # command-line sweeps override the preset's params of the same key
        distributions, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        url = storage_url(self.storage, sweep_dir)
        study, companion = create_studies(self.study_name, url, self.directions, self.sampler, self.pruner,
                                          self.monitor_direction)
        (sweep_dir / STUDY_FILE).write_text(yaml.safe_dump(
            {"storage": url, "study_name": self.study_name, "objectives": dict(zip(self.paths, self.directions)),
             "dashboard": f"optuna-dashboard {url}"}, sort_keys=False))
        log.info("study %r in %s (%d trials so far); optuna-dashboard %s", self.study_name, url,
                 len(study.trials), url)
        done = 0
        while done < self.n_trials:
            batch = [study.ask(distributions) for _ in range(min(self.n_jobs, self.n_trials - done))]
            twins = [companion.ask() for _ in batch]
            overrides = [self._job_overrides(fixed, trial, twin, url) for trial, twin in zip(batch, twins)]
            returns = self.launcher.launch(overrides, initial_job_idx=done)
            for trial, twin, job in zip(batch, twins, returns):
                self._tell(study, companion, trial, twin, job)
            done += len(batch)
        self._write_best(study, sweep_dir)

    def _job_overrides(self, fixed: dict[str, str], trial: optuna.Trial, twin: optuna.Trial,
                       url: str) -> list[str]:
        """The job's overrides: fixed values, the sampled ones, and where to report its epochs."""
        sampled = [f"{k}={_override_value(v)}" for k, v in trial.params.items()]
        return [*(f"{k}={v}" for k, v in fixed.items()), *sampled,
                f"+search.storage={_quote(url)}", f"+search.study={_quote(self.study_name)}",
                f"+search.trial={trial.number}", f"+search.pruning_trial={twin.number}",
                f"+search.monitor={_quote(self.monitor)}",
                f"hydra.sweep.subdir={trial.number}"]  # a resumed or shared study never reuses a job dir

    def _tell(self, study: optuna.Study, companion: optuna.Study, trial: optuna.Trial, twin: optuna.Trial,
              job: Any) -> None:
        """Tell both studies how the job ended, from its results.json."""
        # imported here: it imports Lightning, which must not load while Hydra discovers its plugins (before
        # a job's logging is set up, Lightning would give its logger a handler of its own, off the job's log file)
        from compresslab.records import read_results

        run_dir = Path(OmegaConf.select(job.hydra_cfg, "hydra.runtime.output_dir"))
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            record = read_results(run_dir / "results.json")
        except (OSError, ValueError) as exc:
            record = {"status": "failed", "error": f"no readable results.json in {run_dir}: {exc}"}
        status = record.get("status")
        if status == "pruned":
            trial.set_user_attr("pruned_at_epoch", record.get("pruned_at_epoch"))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            companion.tell(twin, state=optuna.trial.TrialState.PRUNED)
            return
        try:
            if status != "completed":
                raise ValueError(str(record.get("error") or f"status {status}"))
            values = objective_values(record, self.paths)
        except ValueError as exc:
            log.warning("trial %d failed: %s", trial.number, exc)
            trial.set_user_attr("error", str(exc)[:500])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            companion.tell(twin, state=optuna.trial.TrialState.FAIL)
            return
        if self.constraints:  # <= 0 is within budget
            over = objective_values(record, list(self.constraints))
            trial.set_user_attr("constraints", [v - bound for v, bound in zip(over, self.constraints.values())])
        study.tell(trial, values)
        reported = companion.trials[twin.number].intermediate_values
        # the companion's value: the monitored metric's last report (the final epoch)
        last = reported[max(reported)] if reported else values[0]
        companion.tell(twin, last)

    def _write_best(self, study: optuna.Study, sweep_dir: Path) -> None:
        """``optimization_results.yaml``: the best trial, or the Pareto front of a multi-objective study."""
        front = [{"number": t.number, "values": dict(zip(self.paths, t.values)), "params": t.params,
                  "run_dir": t.user_attrs.get("run_dir")} for t in _best_trials(study)]
        states = [t.state.name.lower() for t in study.trials]
        out: dict[str, Any] = {"study_name": self.study_name, "directions": self.directions,
                               "trials": {s: states.count(s) for s in sorted(set(states))}}
        if len(self.directions) == 1 and front:
            out.update(best_value=front[0]["values"][self.paths[0]], best_params=front[0]["params"])
        out["pareto_front" if len(self.directions) > 1 else "best_trials"] = front
        (sweep_dir / "optimization_results.yaml").write_text(yaml.safe_dump(out, sort_keys=False))


def trial_constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    """The budget excesses the sweeper stored on the trial (``value - bound`` per constraint; <= 0 is
    feasible), for the sampler's ``constraints_func``."""
    return list(trial.user_attrs.get("constraints", []))


def _best_trials(study: optuna.Study) -> Sequence[optuna.trial.FrozenTrial]:
    """The best trial (single objective) or the Pareto-optimal ones; [] before any trial completed."""
    try:
        return study.best_trials
    except ValueError:
        return []


def _quote(text: str) -> str:
    """A string as a quoted Hydra override value."""
    if "'" in text:
        raise ValueError(f"cannot pass {text!r} to the jobs: it contains a single quote")
    return f"'{text}'"


def _override_value(value: Any) -> str:
    """A sampled value in override syntax (floats in full precision; strings from choices as they were)."""
    return repr(value) if isinstance(value, float) else str(value)
