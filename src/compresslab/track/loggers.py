"""Experiment loggers and extra Lightning callbacks from config: ``logger=`` and ``callbacks=`` are
groups of ``_target_`` nodes, several at once (``logger=[csv,wandb]``, ``callbacks=[early_stopping,lr_monitor]``),
in the manner of lightning-hydra-template.

A logger node whose ``_target_`` is a factory (``_partial_: true``, as ``logger=wandb``'s) is called with the
run's ``cfg``, ``run_dir`` and ``axes``; any other node is the logger itself (CSV, TensorBoard, MLflow).
The student fit gets every logger and callback; the project's checkpointing (best ``val/acc`` and last,
which results.json's val-selected accuracy and resuming depend on) is always on.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig

from compresslab.errors import ConfigError


def _nodes(cfg: DictConfig, group: str) -> list[tuple[str, DictConfig]]:
    """The ``_target_`` nodes of ``cfg.<group>`` by name; a ConfigError for one without a target."""
    node = cfg.get(group)
    out = []
    for name, spec in (node or {}).items():
        if spec is None:
            continue
        if not isinstance(spec, DictConfig) or "_target_" not in spec:
            raise ConfigError(f"{group}.{name} has no _target_ (got {spec!r}): pick presets with {group}=<name> "
                              f"or {group}=[a,b] from conf/{group}/, or give +{group}.{name}._target_=<class>")
        out.append((str(name), spec))
    return out


def make_loggers(cfg: DictConfig, run_dir: Path, axes: Mapping[str, Any]) -> list:
    """Every logger of ``cfg.logger`` ([] for ``logger=none``)."""
    loggers = []
    for name, spec in _nodes(cfg, "logger"):
        try:
            made = instantiate(spec)
        except Exception as exc:  # a missing optional package names itself in the error
            raise ConfigError(f"logger.{name} ({spec._target_}) could not be created: {exc}") from exc
        if isinstance(made, functools.partial):
            made = made(cfg=cfg, run_dir=Path(run_dir), axes=axes)
        loggers.append(made)
    return loggers


def config_callbacks(cfg: DictConfig) -> list:
    """The Lightning callbacks of ``cfg.callbacks`` (early_stopping, lr_monitor, rich_progress_bar, ...)."""
    callbacks = []
    for name, spec in _nodes(cfg, "callbacks"):
        if "LearningRateMonitor" in str(spec._target_) and not _nodes(cfg, "logger"):
            raise ConfigError(f"callbacks.{name} logs the learning rate to a logger, but logger=none: "
                              "add one, e.g. logger=csv")
        callbacks.append(instantiate(spec))
    return callbacks
