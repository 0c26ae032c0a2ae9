"""What makes a fit a result: it runs at least one optimizer step, and its loss and weights stay finite.

:func:`check_training_config` refuses, before anything trains, a configuration under which a fit
would run no step (``trainer.limit_train_batches=0``, ``trainer.max_steps=0``).
:class:`FiniteTraining` is the cheap per-step guard every fit carries
(:func:`compresslab.train.fit_with_checkpoints`): a finiteness check of the loss per step (one
``item()`` read of the scalar, no extra kernel; no Lightning option has this check: ``detect_anomaly``
costs a backward-graph walk per step and raises on finite-but-suspicious values), a look at every
weight at the end of each epoch, and a fit that ended
without a step. Each raises :class:`~compresslab.errors.TrainingDiverged` with the epoch, the step
and what to try, so the run ends ``failed`` instead of ``completed`` at chance accuracy.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from compresslab.errors import ConfigError, TrainingDiverged

_TRY = ("Try a lower learning rate (teacher.optimizer.lr / student.optimizer.lr), gradient clipping "
        "(trainer.gradient_clip_val=1.0), or a learning-rate warm-up; if the data can hold NaN or inf, check it.")


def check_training_config(cfg: Mapping[str, Any]) -> None:
    """Refuse trainer settings under which a fit would run no step (``epochs >= 1`` is checked with
    the other options, :mod:`compresslab.run_options`)."""
    trainer = cfg.get("trainer") or {}
    limit = trainer.get("limit_train_batches")
    if limit is not None and not isinstance(limit, bool) and isinstance(limit, (int, float)) and limit <= 0:
        raise ConfigError(f"trainer.limit_train_batches={limit!r} runs no training step: an untrained model is not "
                          "a result. Use a positive number of batches (int) or fraction (float in (0, 1]), or "
                          "null for all; for a trained teacher pass teacher.ckpt=<file>.")
    steps = trainer.get("max_steps")
    if steps is not None and not isinstance(steps, bool) and isinstance(steps, int) and steps == 0:
        raise ConfigError("trainer.max_steps=0 runs no training step: use -1 (no limit) or a positive number.")


class FiniteTraining(Callback):
    """End a fit with :class:`TrainingDiverged` at the first non-finite loss (checked every step) or
    weight (checked every epoch), and when the fit ran no optimizer step (module doc)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if type(outputs) is dict or isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        # one read of a scalar loss (no isfinite/all kernels); a non-scalar loss is reduced first
        finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(loss.detach().isfinite().all())
        if not finite:
            raise TrainingDiverged(
                f"training diverged: the loss is {float(loss.detach().float().flatten()[0])} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step} (batch {batch_idx} of the epoch). {_TRY}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, param in pl_module.named_parameters():
            if param.is_floating_point() and not bool(param.detach().isfinite().all()):
                raise TrainingDiverged(
                    f"training diverged: weight {name!r} holds NaN or inf at the end of epoch {trainer.current_epoch} "
                    f"(step {trainer.global_step}). {_TRY}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            raise TrainingDiverged(
                f"the fit ran no training step ({trainer.current_epoch} epochs, 0 optimizer steps): an untrained "
                "model is not a result. Check that the training split has batches (dataset.train_fraction, "
                "trainer.limit_train_batches) and that the epochs are >= 1.")
