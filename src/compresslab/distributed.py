"""Multi-process (DDP) runs under Hydra: one run dir per job, no re-launched sweeps, rank-0 I/O.

Lightning's DDP launcher starts ranks 1..N-1 by re-running the command line. Under a
Hydra multirun that command line is the whole sweep (``-m a=1,2``), and its
``hydra.run.dir`` is not the job's directory, so the children would launch a new
sweep and write to new directories. :func:`install_hydra_ddp_fix` replaces the command
Lightning builds with one that re-runs *this job only*: its own overrides, in its own
output directory. Only global rank 0 writes results, caches and W&B logs.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Sequence

from pytorch_lightning.utilities import rank_zero_only


def is_rank_zero() -> bool:
    """True in the process that writes results (global rank 0; also in single-process runs)."""
    return getattr(rank_zero_only, "rank", 0) == 0


def job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    """The command (and cwd) that starts ``local_rank`` of the current Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    command = [sys.executable, "-m", "compresslab.cli", *list(hc.overrides.task)]
    command += [
        f"hydra.run.dir={hc.runtime.output_dir}",
        "hydra.output_subdir=null",
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
    ]
    return command, get_original_cwd()


def install_hydra_ddp_fix() -> None:
    """Make Lightning's subprocess launcher use :func:`job_subprocess_cmd` (idempotent)."""
    import lightning_fabric.strategies.launchers.subprocess_script as fabric_launcher
    import pytorch_lightning.strategies.launchers.subprocess_script as pl_launcher

    for module in (fabric_launcher, pl_launcher):
        module._hydra_subprocess_cmd = job_subprocess_cmd
    os.environ[OWN_RANK_MARK] = "1"  # inherited by the ranks Lightning starts from this job (JobProcessGroup)


def world_size(trainer_cfg: Any) -> int:
    """Processes a Trainer config asks for: devices per node × nodes (1 for 'auto' on CPU)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str):
        devices = int(devices) if devices.isdigit() else (int(os.environ.get("WORLD_SIZE", 1)) if devices != "-1" else 1)
    elif isinstance(devices, Sequence):
        devices = len(devices)
    return max(1, int(devices)) * max(1, int(trainer_cfg.get("num_nodes", 1) or 1))


def scale_lr(lr: float, world: int, rule: str) -> float:
    """Learning rate for ``world`` processes: ``none``, ``linear`` (Goyal et al. 2017) or ``sqrt``."""
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * world
    if rule == "sqrt":
        return lr * math.sqrt(world)
    from compresslab.errors import ConfigError

    raise ConfigError(f"scaling.lr must be none, linear or sqrt, got {rule!r}")


#: Set by :func:`install_hydra_ddp_fix` before Lightning starts ranks 1..N-1, which inherit it: a rank
#: started with it is one of ours (it exits after its job), not one started by torchrun or SLURM.
OWN_RANK_MARK = "COMPRESSLAB_LAUNCHED_RANK"
#: Variables Lightning's launcher (and :func:`install_hydra_ddp_fix`) set in the launching process.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", OWN_RANK_MARK)


class JobProcessGroup:
    """Context manager around one job: afterwards, tears down the process group and the launcher's
    environment variables that this job created, so the next job of a multirun in the same
    process launches its own ranks instead of waiting for the previous job's.

    A rank that Lightning started for this job (ranks 1..N-1, marked by :data:`OWN_RANK_MARK`)
    destroys its process group too, before its interpreter exits. Left to interpreter shutdown,
    gloo's worker threads were destroyed while still joinable, which aborts the rank
    ("terminate called without an active exception", SIGABRT) when the timing of the exit falls
    badly, as on a loaded machine (pytorch/pytorch#190489; torch registers no atexit destroy for
    gloo, and Lightning registers one for NCCL only). Ranks started by torchrun or SLURM (``LOCAL_RANK`` set without
    the mark) keep their group: their launcher owns it."""

    def __enter__(self) -> "JobProcessGroup":
        self._env = {k: os.environ.get(k) for k in _LAUNCH_ENV}
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist

        if self._env.get("LOCAL_RANK") is not None and self._env.get(OWN_RANK_MARK) is None:
            return  # launched externally (SLURM, torchrun): leave as is
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in self._env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
