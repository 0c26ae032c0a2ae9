"""SLURM: the sweep launcher, what a job records about its SLURM job, and the sbatch dry run.

- The launcher of ``hydra/launcher=slurm`` (and ``slurm_local``) is
  ``hydra_plugins.compresslab_slurm_launcher.SlurmLauncher`` (Hydra loads launchers only from the
  ``hydra_plugins`` package): hydra-submitit-launcher's, waiting for *every* job of a sweep. A job
  that ends without a result (``scancel``, killed, over its time limit, or an error outside the
  run) is recorded as failed by :func:`record_scheduler_failure` and the sweep goes on to its summary.
- what a job records about its SLURM job (``slurm_job_id``, ``restarts``) is read from the
  environment by :mod:`compresslab.slurm_env`.
- The dry run maps the composed launcher config to sbatch options with submitit's own SLURM
  tables and renders submitit's submission file without calling ``sbatch``, so the resources
  a sweep asks for can be checked before it is queued::

    compresslab-sbatch trainer=ddp trainer.devices=4 trainer.num_nodes=2 hydra.launcher.partition=gpu
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf



def last_line(text: str) -> str:
    """The last line of a scheduler message that is not blank or a ``----`` rule."""
    lines = [line for line in text.strip().splitlines() if line.strip() and not set(line.strip()) <= {"-"}]
    return lines[-1].strip() if lines else text.strip()


def record_scheduler_failure(job_dir: Path, error: str, job_id: str, state: str, overrides: list[str],
                             detail: str) -> Path:
    """Mark the job's results.json failed with the scheduler's verdict (a short record if it has none).

    A run that had completed keeps its record; one that was running (killed mid-run) or had
    failed (a SIGTERM stops Lightning) gets ``status: failed``, the verdict as ``error`` (with the
    run's own error after it) and ``slurm_state``.
    """
    from compresslab.track.results import read_results, unresolved_record, write_results

    path = Path(job_dir) / "results.json"
    record = None
    if path.exists():
        try:
            record = read_results(path)
        except (OSError, ValueError):
            record = None
    if isinstance(record, dict) and record.get("status") == "completed":
        return path
    if isinstance(record, dict):
        previous = record.get("error")
        record.update(status="failed", error=error + (f" ({previous})" if previous else ""),
                      finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    else:
        record = unresolved_record(Path(job_dir), RuntimeError(detail), overrides)
        record.update(error=error, stage="scheduler", restarts=None)
    record.update(slurm_job_id=job_id, slurm_state=state)
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    write_results(path, record)
    return path


def sbatch_parameters(launcher: Mapping[str, Any]) -> dict:
    """``_make_sbatch_string`` keyword arguments for a resolved ``hydra.launcher`` node.

    Shared keys (timeout_min, mem_gb, tasks_per_node, ...) are renamed with submitit's own
    SLURM equivalence table, as submitit's AutoExecutor does for hydra-submitit-launcher;
    ``submitit_folder`` and ``max_num_timeout`` configure the executor, not sbatch.
    """
    from submitit.slurm.slurm import SlurmExecutor, _convert_mem

    rename = SlurmExecutor._equivalence_dict()
    params = {}
    for key, value in launcher.items():
        if key in ("_target_", "submitit_folder", "max_num_timeout") or value is None:
            continue
        params[rename.get(key, key)] = value
    if "mem" in params:
        params["mem"] = _convert_mem(params["mem"])
    return params


def sbatch_preview(launcher: Mapping[str, Any], command: str = "python -m compresslab.cli") -> str:
    """The sbatch file text for ``launcher`` (a resolved ``hydra.launcher`` node)."""
    from submitit.slurm.slurm import _make_sbatch_string

    with tempfile.TemporaryDirectory() as folder:
        return _make_sbatch_string(command=command, folder=folder, **sbatch_parameters(launcher))


def compose_launcher(overrides: Sequence[str]) -> dict:
    """The resolved ``hydra.launcher`` node of ``conf/config.yaml`` with ``hydra/launcher=slurm``."""
    from hydra import compose, initialize_config_dir

    from compresslab.config_utils import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    cfg.hydra.launcher.submitit_folder = "preview"  # the real one interpolates the sweep's date dir
    # launcher keys interpolate the job config (trainer.devices, trainer.num_nodes)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
