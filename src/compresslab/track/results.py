"""The per-run ``results.json``: its schema, the assembly of its rows, and its reading and writing
(atomic, also for failed runs). This docstring is the one description of the schema.

Schema version 2 (later versions extend it, never break it)::

    schema_version: 2
    status: "completed" | "failed" | "running" | "pruned" (a search's pruner stopped it; pruned_at_epoch)
    error: str | null      stage (unresolved runs)
    axes: {<each of compresslab.axes.AXES>: the chosen option's name, seed}
    config: resolved Hydra config               run_dir, run_id, started_at, finished_at
    teacher / reference / student: one row per model (reference: the dense fp32 student, same
        architecture, never trained), each with
        - static figures: params, params_nonzero, sparsity, macs, weight_bytes, dtypes, device,
          size_bytes, artifact, size_ratio, expected_speedup_macs / _bytes, speedup_vs_expected
          (compresslab.measure.core.static_profile, :func:`add_ratios`);
        - timed figures: latency_ms_b1 / _bN (+ _p90, _iqr), speedup / speedup_b1 (+ _ci) vs the
          reference, threads, latency_reliable ... (compresslab.measure.latency), measured_in;
        - accuracy: acc_top1 of the saved artifact on the test split, per-class metrics
          (compresslab.measure.per_class); the teacher's and student's training figures
          (acc_top1_last, train_time_s; student: val_acc_top1, best_epoch, epochs_run, resumed_from,
          preemptions);
        - deployment: onnx, backends.<backend>, deployed_speedup (compresslab.deploy.step);
    student.<axis>: for each compression axis that ran, its method's own report (e.g.
        student.prune.sparsity_prunable, student.quant.quant_method). The same keys are also kept
        flat in ``student`` for consumers of version 1; a key two axes (or an axis and a shared
        metric) would both write is refused.
    measured_together: figures of compresslab-measure (compresslab.measure.together)
    data_regime: the data regime's summary (compresslab.data.regime)
    versions: package versions             git_commit: sha of the code that ran
    slurm_job_id, restarts, slurm: the SLURM job (``ARRAY_TASK``), its requeues so far, partition/nodes/tasks
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import subprocess
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from compresslab.slurm_env import slurm_fields
from compresslab import axes as ablation_axes
from compresslab.errors import ConfigError
from compresslab.files import atomic_write_bytes

SCHEMA_VERSION = 2

_PACKAGES = ("torch", "torchvision", "pytorch-lightning", "hydra-core", "torchmetrics", "wandb", "compresslab")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


def write_results(path: Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as JSON to ``path`` atomically (temp file in the same dir + rename)."""
    text = json.dumps(_jsonable(record), indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(Path(path), text.encode("utf-8"))


def write_final_results(path: Path, record: dict[str, Any], run_error: BaseException | None) -> None:
    """Write a run's last record; when that fails (a full disk), write a short failed one.

    The short record keeps the run's own error (``run_error``) if it failed, so the write
    error does not hide why the run stopped. If even the short record can't be written as a
    new file, it overwrites results.json in place (reusing the space the old record held),
    so no run is left saying ``running``. Raises the write error only for a run that had
    otherwise completed: a run whose results can't be saved has failed.
    """
    try:
        write_results(path, record)
        return
    except OSError as exc:
        write_error = exc
    short = {k: record.get(k) for k in ("run_id", "run_dir", "started_at", "finished_at", "axes")}
    short.update(status="failed", error=record.get("error") if run_error is not None else
                 f"could not write results.json: {write_error}",
                 results_write_error=f"{type(write_error).__name__}: {write_error}")
    data = (json.dumps(_jsonable(short), indent=1) + "\n").encode("utf-8")
    try:
        atomic_write_bytes(Path(path), data)
    except OSError:
        with open(path, "r+b" if Path(path).exists() else "wb") as handle:
            handle.truncate(0)
            handle.write(data)
    record.update(short)
    if run_error is None:
        raise write_error


def read_results(path: Path) -> dict:
    """Read one results.json."""
    return json.loads(Path(path).read_text())


def collect_job_results(sweep_dir: Path, job_dirs: Iterable[Path] = ()) -> list[dict]:
    """Every ``results.json`` under ``sweep_dir`` (one per job), in job order (``2/`` before ``10/``).

    ``job_dirs`` are the directories of jobs that were launched: one without a results.json
    (a job that died before writing it) is listed as failed, so no launched job goes uncounted.
    A results.json that can't be read or parsed is kept as ``status: unreadable`` with the reason.
    """
    paths = {p.resolve() for p in Path(sweep_dir).rglob("results.json")}
    paths |= {(Path(d) / "results.json").resolve() for d in job_dirs}
    records = []
    for path in sorted(paths, key=_natural_key):
        if not path.exists():
            record = {"status": "failed", "error": f"the job left no results.json (see {path.parent}/*.log)"}
        else:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(record, dict):
                    raise ValueError(f"holds a JSON {type(record).__name__}, not an object")
            except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON
                record = {"status": "unreadable", "error": f"{type(exc).__name__}: {exc}"}
        record["_path"] = str(path)
        records.append(record)
    return records


def _natural_key(path: Path) -> tuple:
    """Sort key comparing numeric path parts as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def versions() -> dict:
    """Versions of the packages that shape the numbers, plus Python and the platform."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the code that ran (with ``-dirty`` when the tree has changes), or None."""
    here = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def axes_of(cfg: DictConfig) -> dict:
    """The ablation axes of a run: the name chosen in each config group, and the seed."""
    axes = {}
    for group in ablation_axes.AXES:
        node = cfg.get(group)
        axes[group] = node.get("name") if isinstance(node, DictConfig) else None
    axes["seed"] = seed_of(cfg)
    return axes


def seed_of(cfg: DictConfig) -> int:
    """``cfg.seed`` as an int; a ConfigError saying what to pass otherwise."""
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}: pass e.g. seed=0 (a sweep: seed=0,1,2)")
    return seed


def unresolved_record(run_dir: Path, exc: BaseException, overrides: list[str] | None = None) -> dict:
    """The record of a run whose config could not even be read (bad seed, unresolvable
    interpolation): status failed, the overrides that made the job, the error and traceback."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return {
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc)),
        "stage": "config",
        "overrides": list(overrides or []),
        "run_id": Path(run_dir).name,
        "run_dir": str(Path(run_dir).resolve()),
        "started_at": now,
        "finished_at": now,
        "axes": None,
        "config": None,
        "teacher": None,
        "student": None,
        "reference": None,
        "versions": versions(),
        "git_commit": git_commit(),
        **slurm_fields(),
    }


def base_record(cfg: DictConfig, run_dir: Path) -> dict:
    """A results record before the run: status running, config, axes, versions, commit, SLURM job."""
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "running",
        "error": None,
        "run_id": Path(run_dir).name,
        "run_dir": str(Path(run_dir).resolve()),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "finished_at": None,
        "axes": axes_of(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "teacher": None,
        "student": None,
        "reference": None,
        "versions": versions(),
        "git_commit": git_commit(),
        **slurm_fields(),
    }


def add_ratios(rows: Mapping[str, dict | None]) -> None:
    """Size ratio, and the analytic speed-ups (MACs and weight-bytes ratios, a roofline-style
    expectation for compute- and memory-bound runs) beside the measured ones, vs ``rows["reference"]``."""
    ref = rows["reference"]
    for metrics in rows.values():
        if metrics:
            metrics["size_ratio"] = ref["size_bytes"] / metrics["size_bytes"]
            metrics["expected_speedup_macs"] = ref["macs"] / metrics["macs"] if metrics.get("macs") else None
            metrics["expected_speedup_bytes"] = (ref["weight_bytes"] / metrics["weight_bytes"]
                                                 if metrics.get("weight_bytes") else None)
            if metrics.get("speedup") is not None and metrics["expected_speedup_macs"]:
                metrics["speedup_vs_expected"] = metrics["speedup"] / metrics["expected_speedup_macs"]


def add_method_reports(student: dict, reports: Mapping[str, Mapping[str, Any]]) -> None:
    """Put each compression axis's report under ``student.<axis>``, and its keys flat in ``student``
    too (schema version 1's place). A key that two axes, or an axis and a shared metric, both write,
    or one named like an axis (it would replace that axis's block), raises instead of one silently
    replacing the other."""
    owner: dict[str, str] = {}
    for axis, report in reports.items():
        for key in report:
            clash = (owner.get(key) or ("the shared metrics" if key in student else None)
                     or ("an axis's block" if key in ablation_axes.AXES else None))
            if clash:
                raise RuntimeError(f"results.json: student.{key} is reported by {axis} and by {clash}; "
                                   "rename one of them in its method's report()")
            owner[key] = f"axis {axis}"
    for axis, report in reports.items():
        student.update(report)
        student[axis] = dict(report)


def teacher_row(profile: Mapping[str, Any], size: Mapping[str, Any], accuracy: Mapping[str, Any],
                info: Mapping[str, Any]) -> dict:
    """The ``teacher`` row: its profile, file size, test accuracy and how it was obtained."""
    return {**profile, **size, **accuracy, "acc_top1_last": info.get("acc_top1_last"),
            "train_time_s": info.get("train_time_s"), "source": info["source"], "file": info.get("path")}


#: the student fit's figures (``train.fit_with_checkpoints``) copied into the student row, as named there
FIT_FIGURES = {"acc_top1_last": "acc_top1_last", "acc_top1_fit": "acc_top1", "val_acc_top1": "val_acc_top1",
               "best_epoch": "best_epoch", "epochs_run": "epochs_run", "resumed_from": "resumed_from",
               "preemptions": "preemptions", "train_time_s": "train_time_s"}


def student_row(profile: Mapping[str, Any], size: Mapping[str, Any], accuracy: Mapping[str, Any],
                fit: Mapping[str, Any], reports: Mapping[str, Mapping[str, Any]]) -> dict:
    """The ``student`` row: its profile, artifact size, test accuracy, fit figures and the
    compression axes' reports (:func:`add_method_reports`)."""
    row = {**profile, **size, **accuracy, **{key: fit[name] for key, name in FIT_FIGURES.items()}}
    add_method_reports(row, reports)
    return row
