"""The LightningModule that trains one classifier (a teacher, or a student from scratch),
and the helper that runs a fit with best/last checkpoints."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from compresslab.data.regime import labelled_cross_entropy
from compresslab.files import AtomicCheckpointIO
from compresslab.measure.train_tally import TrainTally

log = logging.getLogger(__name__)


class ClassifierModule(pl.LightningModule):
    """Supervised training of ``model`` with cross-entropy (optional label smoothing).

    ``optimizer`` and ``scheduler`` are partials (Hydra ``_partial_: true``) that
    take the parameters / the optimizer. Logs ``train/loss``, ``val/acc``
    (top-1, monitored for the best checkpoint), ``test/acc`` and top-5 when
    there are more than 5 classes.
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
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.top5 = num_classes > 5
        if self.top5:
            self.val_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            self.test_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits for one training batch (subclasses add distillation terms)."""
        logits = self.model(x)
        return labelled_cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, logits = self.training_loss(x, y)
        self._tally.add(loss, logits, y)
        return loss

    def configure_callbacks(self):
        return [self._tally]

    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch
        logits = self.model(x)
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
        max_epochs=int(max_epochs), callbacks=[checkpoint, last_checkpoint, clock, preemption, *callbacks],
        logger=logger,
        default_root_dir=str(ckpt_dir), plugins=[AtomicCheckpointIO()],
    )
    last = ckpt_dir / "last.ckpt"
    resume_from = str(last) if resume and last.exists() else None
    if resume_from:
        check_resumable(last)
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


class FitTime(Callback):
    """Wall time spent in ``fit``, summed over resumed runs: it travels in the checkpoint
    (callback state), so re-running a finished run keeps the original fit's time."""

    def __init__(self) -> None:
        self.before_s = 0.0
        self._start: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def total_s(self) -> float:
        """Time of earlier (resumed-from) fits plus this one so far."""
        return self.before_s + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"train_time_s": self.total_s()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before_s = float(state_dict.get("train_time_s", 0.0))


def preemption_signal() -> signal.Signals:
    """The signal submitit treats as preemption / imminent time-out (``SUBMITIT_PREEMPT_SIGNAL``, USR2)."""
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}"]


class JobRequeued(SystemExit):
    """The job wrote its checkpoint and was requeued by the scheduler; this process ends here."""


class CheckpointOnPreemption(Callback):
    """Checkpoint on the scheduler's preemption/time-out signal, then let the job be requeued.

    Under submitit (``hydra/launcher=slurm``) SLURM sends USR2 before a time limit, or at once on
    preemption with ``preempt_send_user_signal``, and submitit's handler requeues the job and exits.
    Left alone, that loses the epoch in progress. During a fit this callback takes the signal over:
    at the next training/validation batch boundary (agreed across DDP ranks) it writes
    ``last.ckpt`` with the epoch and step reached, then hands the signal to the handler it replaced
    (submitit: requeue and exit, as :class:`JobRequeued`). The requeued job resumes from that
    checkpoint in the same run dir. Each preemption is kept in the checkpoint (this callback's
    state) and returned by :func:`fit_with_checkpoints` as ``preemptions``: epoch and step at the
    signal, the epoch and step the next run resumed at, SLURM job id and restart count.
    Without a Python-level handler for the signal (not under submitit) it does nothing.
    """

    def __init__(self, last_path: Path, signum: int | None = None) -> None:
        self.last_path = Path(last_path)
        self.signum = signal.Signals(signum) if signum is not None else preemption_signal()
        self.preemptions: list[dict[str, Any]] = []
        self._previous: Any = None
        self._pending = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and "SLURM_JOB_ID" in os.environ:  # which rank this SLURM task became
            env = getattr(trainer.strategy, "cluster_environment", None) or \
                trainer._accelerator_connector.cluster_environment
            log.info("rank %d/%d: SLURM_PROCID=%s SLURM_LOCALID=%s pid=%d cluster_environment=%s",
                     trainer.global_rank, trainer.world_size, os.environ.get("SLURM_PROCID"),
                     os.environ.get("SLURM_LOCALID"), os.getpid(), type(env).__name__)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from compresslab.slurm_env import slurm_job_id, slurm_restarts

        if self.preemptions and self.preemptions[-1].get("resumed_at_epoch") is None:  # restored with the ckpt
            self.preemptions[-1].update(resumed_at_epoch=int(trainer.current_epoch),
                                        resumed_at_step=int(trainer.global_step),
                                        resumed_in_job=slurm_job_id(), resumed_restart=slurm_restarts())
            log.info("resumed at epoch %d, step %d after a preemption at epoch %d, step %d",
                     trainer.current_epoch, trainer.global_step, self.preemptions[-1]["epoch"],
                     self.preemptions[-1]["step"])
        previous = signal.getsignal(self.signum)
        if callable(previous) and previous is not self._on_signal:
            self._previous, self._pending = previous, False
            signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._pending = True
        log.warning("caught %s: writing %s at the next batch boundary", signal.Signals(signum).name, self.last_path)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._maybe_checkpoint(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.state.fn == "fit":  # not trainer.test/validate after the fit
            self._maybe_checkpoint(trainer)

    def _maybe_checkpoint(self, trainer: pl.Trainer) -> None:
        if self._previous is None or not trainer.strategy.reduce_boolean_decision(self._pending, all=False):
            return
        from compresslab.slurm_env import slurm_job_id, slurm_restarts

        entry = {"signal": self.signum.name, "epoch": int(trainer.current_epoch), "step": int(trainer.global_step),
                 "slurm_job_id": slurm_job_id(), "restart": slurm_restarts(),
                 "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "resumed_at_epoch": None}
        self.preemptions.append(entry)
        trainer.save_checkpoint(self.last_path)
        log.warning("%s at epoch %d, step %d: wrote %s", self.signum.name, entry["epoch"], entry["step"],
                    self.last_path)
        self._hand_over()

    def _hand_over(self) -> None:
        """Restore the replaced handler and, if the signal came, call it (submitit: requeue + exit)."""
        previous, pending = self._previous, self._pending
        if previous is None:
            return
        self._previous, self._pending = None, False
        signal.signal(self.signum, previous)
        if pending:
            try:
                previous(self.signum, None)
            except SystemExit as exc:
                where = f"epoch {self.preemptions[-1]['epoch']}" if self.preemptions else "the end of the fit"
                raise JobRequeued(f"{self.signum.name}: checkpoint {self.last_path} written at {where}; "
                                  "the job was requeued and resumes from it") from exc

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hand_over()  # a signal after the last batch: last.ckpt is the finished fit's

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def state_dict(self) -> dict[str, Any]:
        return {"preemptions": self.preemptions}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.preemptions = list(state_dict.get("preemptions", []))


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
