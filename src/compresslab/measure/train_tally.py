"""The training split's loss and accuracy per epoch, tallied without per-step logging."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from compresslab.data.regime import UNLABELED


class TrainTally(Callback):
    """``train/loss`` (sample-weighted mean) and ``train/acc`` (labelled samples) per epoch: one tensor
    of sums per step, logged at the epoch's end (summed over DDP ranks). Per-step ``self.log`` and a
    torchmetrics ``forward`` cost more than a small model's step (``benchmarks/lightning_overhead.py``)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch: its mean ``loss``, ``logits`` and labels (``UNLABELED`` ones not counted)."""
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum()  # an UNLABELED target (-1) never matches
            step = torch.stack([loss.detach().double() * y.numel(), correct.double(),
                                (y != UNLABELED).sum().double(), torch.tensor(float(y.numel()), device=y.device).double()])
            self.sums = step if self.sums is None else self.sums + step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sums = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sums is not None:
            loss_sum, correct, labelled, n = trainer.strategy.reduce(self.sums, reduce_op="sum").tolist()
            pl_module.log("train/loss", loss_sum / n, prog_bar=True, rank_zero_only=True)
            if labelled:
                pl_module.log("train/acc", correct / labelled, rank_zero_only=True)
        self.sums = None
