"""The LightningModule that trains one classifier (a teacher, or a student from scratch),
and the helper that runs a fit with best/last checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from compresslab.data.regime import labelled_cross_entropy, token_rows
from compresslab.files import AtomicCheckpointIO
from compresslab.fit_callbacks import CheckpointOnPreemption, FitTime
from compresslab.fit_speed import EpochSchedulerSteps, manual_step_supported, no_failing_nvml_probe, skip_noop_hooks
from compresslab.measure.train_tally import TrainTally
from compresslab.train_guard import FiniteTraining

log = logging.getLogger(__name__)


class ClassifierModule(pl.LightningModule):
    """Supervised training of ``model`` with cross-entropy (optional label smoothing).

    ``optimizer`` and ``scheduler`` are partials (Hydra ``_partial_: true``) that
    take the parameters / the optimizer. Logs ``train/loss``, ``val/acc``
    (top-1, monitored for the best checkpoint), ``test/acc`` and top-5 when
    there are more than 5 classes.

    The optimizer step is taken in :meth:`training_step` (Lightning's manual optimization: the same
    zero_grad, backward through the strategy and precision plugin, ``on_before_optimizer_step``
    hooks and step, without the automatic loop's closure, about 0.2 ms a step), and the epoch
    scheduler is stepped by :class:`~compresslab.fit_speed.EpochSchedulerSteps`. A fit that needs what
    only the automatic loop does (``trainer.gradient_clip_val``, ``trainer.accumulate_grad_batches``,
    a scheduler that is not stepped per epoch by count) runs it: see :attr:`automatic_optimization`.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = float(label_smoothing)
        self._tally = TrainTally()
        self._scheduler_steps = EpochSchedulerSteps()
        self._force_automatic = False
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.top5 = num_classes > 5
        if self.top5:
            self.val_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            self.test_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` (a str or None) around each of a step's ~40 hook calls;
        # nn.Module.__setattr__'s parameter/buffer/submodule checks cannot apply to it.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def automatic_optimization(self) -> bool:  # type: ignore[override]
        """Lightning's automatic loop where the fit needs it (gradient clipping or accumulation set on
        the trainer, a scheduler :class:`EpochSchedulerSteps` cannot step, or set to True by hand);
        otherwise :meth:`training_step` steps the optimizer itself."""
        if self._force_automatic:
            return True
        trainer = self._trainer
        return trainer is not None and not manual_step_supported(trainer)

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self._force_automatic = bool(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits for one training batch (subclasses add distillation terms); sequence
        outputs (a causal LM) are scored per position (:func:`~compresslab.data.regime.token_rows`)."""
        logits, y = token_rows(self.model(x), y)
        return labelled_cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, logits = self.training_loss(x, y)
        self._tally.add(loss, *token_rows(logits, y))
        if not self.automatic_optimization:
            self.optimizer_step_now(loss)
        return loss

    def optimizer_step_now(self, loss: torch.Tensor) -> None:
        """What Lightning's automatic loop does after the forward, in its order: ``zero_grad``,
        backward (strategy and precision plugin: DDP, loss scaling), the optimizer step (its
        ``on_before_optimizer_step`` hooks, the step count)."""
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()

    def configure_callbacks(self):
        return skip_noop_hooks([self._tally, self._scheduler_steps])

    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch
        logits, y = token_rows(self.model(x), y)
        loss = F.cross_entropy(logits, y)
        acc = getattr(self, f"{stage}_acc")
        acc(logits, y)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", acc, on_epoch=True, prog_bar=True)
        if self.top5:
            acc5 = getattr(self, f"{stage}_acc5")
            acc5(logits, y)
            self.log(f"{stage}/acc_top5", acc5, on_epoch=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def trainable_parameters(self):
        """Parameters the optimizer updates (a distillation module adds its adapters)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("ClassifierModule needs an optimizer factory to train")
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if not EpochSchedulerSteps.can_step(scheduler):
            self._force_automatic = True
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class KeyedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``state_key`` is built once: Lightning formats it for every callback hook
    of every step (a dict repr each time), and it never changes after construction."""

    @property
    def state_key(self) -> str:
        if "_state_key" not in self.__dict__:
            self.__dict__["_state_key"] = super().state_key
        return self.__dict__["_state_key"]


def fit_with_checkpoints(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    trainer_factory: Callable[..., pl.Trainer],
    ckpt_dir: Path,
    max_epochs: int,
    callbacks: Sequence[Callback] = (),
    logger: Any = False,
    resume: bool = True,
) -> dict:
    """Fit ``module`` keeping the best (by ``val/acc``) and the last checkpoint in ``ckpt_dir``.

    Resumes from ``ckpt_dir/last.ckpt`` when it exists and ``resume`` is set.
    Checkpoints are read with ``weights_only=True``. Returns test accuracy of the
    last epoch and of the val-selected checkpoint, leaving the val-selected
    weights loaded in ``module``.
    """
    ckpt_dir = Path(ckpt_dir)
    checkpoint = KeyedCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor="val/acc", mode="max", auto_insert_metric_name=False,
    )
    # Lightning 2.6's save_last only writes when a top-k save happened: keep `last` separately.
    last_checkpoint = KeyedCheckpoint(
        dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False,
    )
    clock = FitTime()
    preemption = CheckpointOnPreemption(ckpt_dir / "last.ckpt")
    trainer: pl.Trainer = trainer_factory(
        max_epochs=int(max_epochs),
        callbacks=[checkpoint, last_checkpoint, clock, preemption, FiniteTraining(), *callbacks],
        logger=logger,
        default_root_dir=str(ckpt_dir), plugins=[AtomicCheckpointIO()],
    )
    skip_noop_hooks([*trainer.callbacks, module])
    last = ckpt_dir / "last.ckpt"
    resume_from = str(last) if resume and last.exists() else None
    if resume_from:
        check_resumable(last)
    with no_failing_nvml_probe():
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    train_time = clock.total_s()
    last_acc = _test_acc(trainer, module, datamodule, ckpt_path=None)
    best_path = checkpoint.best_model_path
    if best_path and Path(best_path).exists():
        state = torch.load(best_path, map_location="cpu", weights_only=True)
        current = module.state_dict()
        same = state["state_dict"].keys() == current.keys() and all(
            torch.equal(v, current[k].detach().cpu()) for k, v in state["state_dict"].items())
        module.load_state_dict(state["state_dict"])
        # the val-selected weights are the last ones: their test accuracy was just measured
        best_acc = last_acc if same else _test_acc(trainer, module, datamodule, ckpt_path=None)
        best_epoch = int(state.get("epoch", -1))
    else:  # no validation ran (e.g. limit_val_batches=0): the last epoch is the selection
        best_acc, best_epoch = last_acc, trainer.current_epoch - 1
    return {
        "acc_top1": best_acc,
        "val_acc_top1": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "acc_top1_last": last_acc,
        "best_epoch": best_epoch,
        "epochs_run": int(trainer.current_epoch),
        "resumed_from": resume_from,
        "preemptions": preemption.preemptions,
        "train_time_s": train_time,
        "trainer": trainer,
    }


def check_resumable(last: Path) -> None:
    """Refuse to resume from a damaged ``last.ckpt`` with a message naming it and the way out."""
    from compresslab.artifact import read_payload
    from compresslab.errors import CheckpointError

    try:
        read_payload(last)
    except CheckpointError as exc:
        raise CheckpointError(
            f"Cannot resume: {exc} Re-run with resume=false to train this fit from the start, or delete {last} "
            "(best.ckpt beside it is not used for resuming).") from exc


def _test_acc(trainer: pl.Trainer, module, datamodule, ckpt_path) -> float:
    out = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    return float(out[0]["test/acc"])


class PerformanceOptions(Callback):
    """Speed options for a fit: channels-last weights for 2-D conv nets on GPU
    (``channels_last``: true / false / "auto" = on for GPU runs) and ``torch.compile``
    of the network in place (``nn.Module.compile``, so state-dict keys do not change)."""

    def __init__(self, channels_last: bool | str = "auto", compile: bool = False) -> None:
        self.channels_last = channels_last
        self.compile = bool(compile)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        on_gpu = trainer.strategy.root_device.type == "cuda"
        wanted = on_gpu if self.channels_last == "auto" else bool(self.channels_last)
        if wanted and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            model.to(memory_format=torch.channels_last)
        if self.compile:
            model.compile()
