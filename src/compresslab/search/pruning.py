"""Early stopping of search trials: a Lightning callback reports the per-epoch validation metric to
the trial's companion pruning study (:func:`compresslab.search.study.companion_trial`) and stops the
fit when the study's pruner (median, successive halving, Hyperband, ...) says so.

A stopped run raises :class:`TrialPrunedAtEpoch`; the pipeline records it as ``status: pruned`` with
``pruned_at_epoch`` in results.json, and the sweeper tells the study the trial was pruned.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)


class TrialPrunedAtEpoch(optuna.TrialPruned):
    """The pruner stopped this trial after ``epoch`` epochs (1-based), its metric then ``value``."""

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(f"pruned by the search's pruner after epoch {epoch} (validation metric {value:.4f})")
        self.epoch = int(epoch)
        self.value = float(value)


def pruned_epoch(exc: BaseException | None) -> int | None:
    """The epoch a pruned run stopped at, or None when ``exc`` is not a pruning."""
    return exc.epoch if isinstance(exc, TrialPrunedAtEpoch) else None


class OptunaPruning(Callback):
    """Report ``monitor`` after each validation to ``trial`` (step = epochs done) and prune on the
    pruner's word. Only global rank 0 talks to the study; its decision is broadcast to the other ranks.

    Written here rather than taken from optuna-integration's ``PyTorchLightningPruningCallback``: that
    one needs the trial object in the training process, while a Hydra job gets only the trial's number
    and storage, and it does not record the epoch for results.json.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = "val/acc") -> None:
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(f"the search prunes on {self.monitor!r}, which this fit does not log "
                           f"(logged: {sorted(trainer.callback_metrics)}); set hydra.sweeper.monitor")
        epoch = trainer.current_epoch + 1
        prune = False
        if trainer.is_global_zero:
            self.trial.report(float(value), step=epoch)
            prune = self.trial.should_prune()
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            log.info("trial pruned after epoch %d (%s=%.4f)", epoch, self.monitor, float(value))
            raise TrialPrunedAtEpoch(epoch, float(value))


def search_callbacks(cfg: DictConfig) -> list[Callback]:
    """The pruning callback of a search job (``search.*`` set by the sweeper), else []."""
    node = cfg.get("search")
    if not node or node.get("pruning_trial") is None:
        return []
    from compresslab.search.study import companion_trial

    trial = companion_trial(node.study, node.storage, int(node.pruning_trial), job_pruner(node))
    return [OptunaPruning(trial, str(node.get("monitor") or "val/acc"))]


def job_pruner(search: DictConfig) -> Any:
    """The pruner of the sweep this job belongs to: ``search.pruner`` when the job's config has one, else
    the sweep's ``hydra.sweeper.pruner``. Optuna keeps no pruner in the storage, so each job builds it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    node = search.get("pruner")
    if node is None and HydraConfig.initialized():
        node = HydraConfig.get().sweeper.get("pruner")
    if node is None:
        from compresslab.errors import ConfigError

        raise ConfigError("search.pruning_trial is set but no pruner is configured: run the job from "
                          "hydra/sweeper=optuna*, or give +search.pruner={_target_: optuna.pruners.MedianPruner}")
    return instantiate(node)
