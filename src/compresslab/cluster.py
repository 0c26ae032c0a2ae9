"""SLURM dry run: the sbatch script that ``hydra/launcher=slurm`` would submit for one job.

Maps the composed launcher config to sbatch options with submitit's own SLURM
tables and renders submitit's submission file without calling ``sbatch``, so the
resources a sweep asks for can be checked before it is queued.

    python -m compresslab.cluster trainer=ddp trainer.devices=4 trainer.num_nodes=2 hydra.launcher.partition=gpu
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf


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

    from compresslab.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    cfg.hydra.launcher.submitit_folder = "preview"  # the real one interpolates the sweep's date dir
    # launcher keys interpolate the job config (trainer.devices, trainer.num_nodes)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the sbatch script for the given overrides."""
    print(sbatch_preview(compose_launcher(list(argv if argv is not None else sys.argv[1:]))))


if __name__ == "__main__":
    main()
