"""The training split's loss and accuracy per epoch, tallied without per-step logging."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from compresslab.data.regime import UNLABELED


class TrainTally(Callback):
    """``train/loss`` (sample-weighted mean) and ``train/acc`` (labelled samples) per epoch, logged at
    the epoch's end (summed over DDP ranks).

    A step costs one tensor op (the predictions' ``argmax``): the step's loss, predictions and labels
    are kept (no copy, no device sync) and reduced every ``fold_every`` kept samples (token positions
    for a causal LM) and at the epoch's end. Per-step ``self.log``, a torchmetrics ``forward`` or a
    handful of small tensor ops per step cost more than a small model's step on a CPU
    (``benchmarks/lightning_overhead.py``).
    """

    def __init__(self, fold_every: int = 1 << 20) -> None:
        self.fold_every = int(fold_every)
        self._partial: torch.Tensor | None = None
        self._clear()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch: its mean ``loss``, ``logits`` and labels (``UNLABELED`` ones not counted)."""
        self._losses.append(loss.detach())
        self._sizes.append(y.numel())
        self._preds.append(logits.detach().argmax(1))
        self._targets.append(y)
        self._kept += y.numel()
        if self._kept >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        """Reduce what is kept into the running sums (bounded memory over a long epoch)."""
        if self._losses:
            losses = torch.stack([t.reshape(()) for t in self._losses]).double()
            sizes = torch.as_tensor(self._sizes, dtype=torch.float64, device=losses.device)
            preds, targets = torch.cat(self._preds), torch.cat(self._targets)
            correct = (preds == targets).sum()  # an UNLABELED target (-1) never matches
            labelled = (targets != UNLABELED).sum()
            step = torch.stack([(losses * sizes).sum(), correct.double(), labelled.double(), sizes.sum()])
            self._partial = step if self._partial is None else self._partial + step
        self._losses, self._sizes, self._preds, self._targets, self._kept = [], [], [], [], 0

    def sums(self) -> torch.Tensor | None:
        """``[loss · samples, correct, labelled samples, samples]`` of the epoch so far (float64), or None."""
        self._fold()
        return self._partial

    def _clear(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._preds: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._kept, self._partial = 0, None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clear()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sums = self.sums()
        if sums is not None:
            loss_sum, correct, labelled, n = trainer.strategy.reduce(sums, reduce_op="sum").tolist()
            pl_module.log("train/loss", loss_sum / n, prog_bar=True, rank_zero_only=True)
            if labelled:
                pl_module.log("train/acc", correct / labelled, rank_zero_only=True)
        self._clear()
