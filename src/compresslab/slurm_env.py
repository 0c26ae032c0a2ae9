"""What a job knows about its SLURM job, read from the environment SLURM sets: for results.json
(:func:`slurm_fields`) and for the requeue-on-preemption callback of :mod:`compresslab.train`."""

from __future__ import annotations

import os
from typing import Mapping


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """This process's SLURM job as squeue/sacct/submitit name it (``ARRAY_TASK`` for a sweep job), or None."""
    env = os.environ if env is None else env
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return env.get("SLURM_JOB_ID")


def slurm_restarts(env: Mapping[str, str] | None = None) -> int:
    """How many times SLURM has requeued this job (``SLURM_RESTART_COUNT``; 0 when never, or outside SLURM)."""
    env = os.environ if env is None else env
    value = env.get("SLURM_RESTART_COUNT", "")
    return int(value) if value.isdigit() else 0


def slurm_fields(env: Mapping[str, str] | None = None) -> dict:
    """results.json keys of a run: ``slurm_job_id`` (None outside SLURM), ``restarts`` (requeues after
    preemption or time-out, ``max_num_timeout``), and ``slurm`` (partition, nodes, tasks) under SLURM."""
    env = os.environ if env is None else env
    job = slurm_job_id(env)
    details = None
    if job is not None:
        details = {"partition": env.get("SLURM_JOB_PARTITION"), "nodes": env.get("SLURM_JOB_NODELIST"),
                   "ntasks": int(env["SLURM_NTASKS"]) if env.get("SLURM_NTASKS", "").isdigit() else None,
                   "cpus_per_task": env.get("SLURM_CPUS_PER_TASK")}
    return {"slurm_job_id": job, "restarts": slurm_restarts(env), "slurm": details}
