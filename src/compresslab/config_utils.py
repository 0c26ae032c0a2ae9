"""Where the config tree is, and small helpers around Hydra's ``instantiate`` for compresslab's config nodes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf



def _config_dir() -> str:
    """The Hydra config tree: ``COMPRESSLAB_CONFIG_DIR`` when set; else the copy an installed wheel ships
    as ``compresslab/conf`` (setup.py's build step puts the checkout's ``conf/`` there); else the
    checkout's ``conf/`` (source and editable installs)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return os.environ.get("COMPRESSLAB_CONFIG_DIR") or str(packaged if (packaged / "config.yaml").is_file()
                                                           else here.parents[1] / "conf")


#: the Hydra config tree (see :func:`_config_dir`)
CONFIG_DIR = _config_dir()


def instantiate_node(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate`` a group node, dropping its ``name`` key (a label for results, not an argument)."""
    spec = OmegaConf.to_container(node, resolve=True)
    spec.pop("name", None)
    return instantiate(spec, **kwargs)


def recipe_kwargs(recipe: DictConfig, cfg: DictConfig) -> dict:
    """Optimizer/scheduler partials and label smoothing of a teacher/student recipe node.

    ``dataset.batch_size`` is per device; with ``scaling.lr=linear|sqrt`` the optimizer's
    ``lr`` is scaled by the number of processes (devices × nodes).
    """
    from functools import partial

    from compresslab.distributed import scale_lr, world_size

    optimizer = instantiate(recipe.optimizer)
    rule = str(cfg.get("scaling", {}).get("lr", "none"))
    if rule != "none" and "lr" in optimizer.keywords:
        optimizer = partial(optimizer, lr=scale_lr(float(optimizer.keywords["lr"]), world_size(cfg.trainer), rule))
    return {
        "optimizer": optimizer,
        "scheduler": instantiate(recipe.scheduler) if recipe.get("scheduler") else None,
        "label_smoothing": float(recipe.get("label_smoothing", 0.0)),
    }


def arch_spec(model_cfg: DictConfig) -> dict:
    """The plain-dict arch spec (``_target_`` + kwargs) of a teacher/student config."""
    return OmegaConf.to_container(model_cfg.arch, resolve=True)
