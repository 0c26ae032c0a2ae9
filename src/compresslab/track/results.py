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
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

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
    """Write ``record`` as JSON to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_jsonable(record), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_results(path: Path) -> dict:
    """Read one results.json."""
    return json.loads(Path(path).read_text())


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
    axes["seed"] = int(cfg.seed)
    return axes


def base_record(cfg: DictConfig, run_dir: Path) -> dict:
    """A results record before the run: status running, config, axes, versions, commit."""
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
    }
