"""Small helpers around Hydra's ``instantiate`` for compresslab's config nodes."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def instantiate_node(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate`` a group node, dropping its ``name`` key (a label for results, not an argument)."""
    spec = OmegaConf.to_container(node, resolve=True)
    spec.pop("name", None)
    return instantiate(spec, **kwargs)
