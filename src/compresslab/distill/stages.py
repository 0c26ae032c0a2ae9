"""Stages that run before the main distillation fit, each as its own Lightning fit.

Several methods train something before the student's main fit: FitNets' first stage
(the student up to the hint layer and the regressor, on the hint loss), AB's and FSP's
initialisation (the student's feature layers on the AB / FSP loss), FT's paraphraser
(an autoencoder of the teacher's feature, on its reconstruction error). They are all one
thing here: a :class:`Stage` — a loss of one batch and the parameters it trains — fitted
by :func:`run_stage` with a ``pytorch_lightning.Trainer`` of its own on the training data
of the main fit, on the same device and with the same precision, batch limit and gradient
clipping. The stage list comes from the config: :func:`stage_list` is every feature-loss entry
with ``init_epochs > 0``, in config order. :func:`run_pending_stages` fits the ones a
:class:`~compresslab.distill.module.DistillationModule` has not done yet when its fit starts
(``on_fit_start``, after a resumed checkpoint has been restored with ``init_done``, so a resumed
run does not repeat them). Under DDP every rank runs the stage on its own device and rank 0's
result is broadcast before the main fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from compresslab.distill.loss_config import FeatureEntry
from compresslab.distill.taps import run_until_captured
from compresslab.errors import ConfigError

__all__ = ["Stage", "StageModule", "run_stage", "stage_trainer_kwargs", "stage_list", "entry_stage",
           "run_pending_stages"]


@dataclass
class Stage:
    """One pre-training stage: ``loss(x, y, index)`` of a batch, the parameters it trains,
    the modules switched to train mode while it runs, and its number of epochs."""

    name: str
    epochs: int
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    parameters: Sequence[nn.Parameter]
    train_modules: Sequence[nn.Module] = ()


class StageModule(pl.LightningModule):
    """The LightningModule of a :class:`Stage`. It holds the stage's modules by reference only
    (they belong to the distillation module, which the main fit moves and checkpoints), so the
    stage's trainer neither moves them nor adds them to its own state."""

    def __init__(self, stage: Stage, optimizer_factory: Callable[..., torch.optim.Optimizer]) -> None:
        super().__init__()
        object.__setattr__(self, "stage", stage)
        self.optimizer_factory = optimizer_factory
        self.epoch_losses: list[float] = []
        self._sum = 0.0
        self._count = 0

    def on_train_epoch_start(self) -> None:
        for module in self.stage.train_modules:
            module.train()
        self._sum, self._count = 0.0, 0

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        index = batch[2] if len(batch) > 2 else None
        loss = self.stage.loss(x, y, index)
        self._sum += float(loss.detach()) * len(x)
        self._count += len(x)
        return loss

    def on_train_epoch_end(self) -> None:
        self.epoch_losses.append(self._sum / max(self._count, 1))
        rank_zero_info(f"{self.stage.name} stage: epoch {len(self.epoch_losses)}/{self.stage.epochs} "
                       f"loss {self.epoch_losses[-1]:.4g}")

    def configure_optimizers(self):
        return self.optimizer_factory(list(self.stage.parameters))


def stage_trainer_kwargs(outer: pl.Trainer | None, device: torch.device) -> dict:
    """Trainer settings of a stage: the main fit's device, precision, batch limit and clipping;
    no validation, checkpoints, logger or progress bar (the stage's losses are printed)."""
    if device.type == "cuda":
        accelerator, devices = "gpu", [device.index or 0]
    else:
        accelerator, devices = device.type, 1
    kwargs = dict(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  num_sanity_val_steps=0)
    if outer is not None:
        kwargs.update(precision=outer.precision, limit_train_batches=outer.limit_train_batches,
                      gradient_clip_val=outer.gradient_clip_val, default_root_dir=outer.default_root_dir)
    return kwargs


def _broadcast_from_rank0(modules: Sequence[nn.Module]) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)


def run_stage(stage: Stage, loader, optimizer_factory, device: torch.device, outer: pl.Trainer | None = None,
              sync: Sequence[nn.Module] = ()) -> list[float]:
    """Fit ``stage`` for ``stage.epochs`` epochs on ``loader``; returns each epoch's mean loss.

    ``sync``: the modules whose state rank 0 broadcasts afterwards when a process group is up."""
    module = StageModule(stage, optimizer_factory)
    trainer = pl.Trainer(max_epochs=int(stage.epochs), **stage_trainer_kwargs(outer, device))
    trainer.fit(module, train_dataloaders=loader)
    _broadcast_from_rank0(sync)
    return module.epoch_losses


# ----------------------------------------------------------------------------- the stages of a distillation
# ``module`` below is a DistillationModule (not imported: it imports this file).
def stage_list(entries: Sequence[FeatureEntry]) -> list[tuple[int, FeatureEntry]]:
    """The stages before the main fit, in config order: ``(k, entry)`` for every feature-loss entry
    with ``init_epochs > 0`` (``k``: the entry's position, its flag in ``init_done``)."""
    return [(k, entry) for k, entry in enumerate(entries) if entry.init_epochs > 0]


def stage_parameters(module: Any, entry: FeatureEntry) -> list[nn.Parameter]:
    """What ``entry``'s stage trains: its loss's stage parameters and, when the stage runs the
    student, the student's parameters used up to the taps and the entry's adapters."""
    params: dict[int, nn.Parameter] = {}
    if entry.loss.stage_uses_student:
        modules = dict(module.model.named_modules())
        names: dict[str, None] = {}
        for tap in entry.student_layers:
            names.update(dict.fromkeys(module.wiring.probe_student.modules_run_before(tap)))
        for name in names:
            for p in modules[name].parameters(recurse=False):
                params[id(p)] = p
        for i in range(len(entry.student_layers)):
            for p in module.adapter(entry, i).parameters():
                params[id(p)] = p
    for p in entry.loss.stage_parameters():
        params[id(p)] = p
    return [p for p in params.values() if p.requires_grad]


def stage_loss(module: Any, entry: FeatureEntry, x: torch.Tensor, y: torch.Tensor,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """``entry``'s stage loss of one batch: the student runs only as far as its taps."""
    _, t_feats = module.frozen_teacher.outputs(x, index)
    t = [t_feats[tap] for tap in entry.teacher_layers]
    s = None
    if entry.loss.stage_uses_student:
        s_feats = run_until_captured(module.model, x, entry.student_layers, entry.calls)
        s = [module.adapter(entry, i)(s_feats[tap]) for i, tap in enumerate(entry.student_layers)]
    return entry.loss.stage_loss(s, t, target=y, index=index, epoch=0)


def entry_stage(module: Any, entry: FeatureEntry) -> Stage:
    """The :class:`Stage` of a feature-loss entry of ``module``."""
    return Stage(name=entry.name, epochs=entry.init_epochs,
                 loss=lambda x, y, index: stage_loss(module, entry, x.to(module.device), y.to(module.device), index),
                 parameters=stage_parameters(module, entry),
                 train_modules=[module.model, module.adapters, entry.loss])


def run_pending_stages(module: Any) -> None:
    """Fit, once each, the stages of ``module``'s stage list not done yet, on its training data."""
    for k, entry in stage_list(module.entries):
        if bool(module.init_done[k]):
            continue
        dm = getattr(module.trainer, "datamodule", None)
        if dm is None:
            raise ConfigError(f"{entry.name}: init_epochs > 0 needs a datamodule (its training data feeds the stage)")
        was_training = module.training
        module.train()
        losses = run_stage(entry_stage(module, entry), dm.train_dataloader(), module.optimizer_factory,
                           module.device, outer=module.trainer, sync=[module.model, module.adapters, entry.loss])
        module.to(module.device)  # (a no-op unless the stage's trainer moved something)
        module.init_stage_losses[entry.name] = losses
        module.init_done[k] = True
        module.train(was_training)
