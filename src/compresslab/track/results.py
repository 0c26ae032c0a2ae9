"""The per-run ``results.json``: written atomically, also for failed runs.

Schema (later versions extend it, never break it)::

    status: "completed" | "failed" | "running"      error: str | null
    axes: {dataset, teacher, student, distill, prune, quant, lowrank, seed}
    config: resolved Hydra config               run_dir, run_id, started_at, finished_at
    teacher / student: metrics (acc_top1, acc_top1_last, params, params_nonzero, sparsity,
        macs, size_bytes, size_ratio, latency_ms_b1, latency_ms_b1_p90, latency_ms_bN,
        latency_batch, speedup, threads, device, train_time_s)
    reference: dense fp32 student (same architecture, uncompressed): size and latency
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
from compresslab.errors import ConfigError
from compresslab.files import atomic_write_bytes

AXES = ("dataset", "teacher", "student", "distill", "prune", "quant", "lowrank")
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
    for group in AXES:
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
