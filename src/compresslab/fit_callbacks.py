"""Callbacks of every fit that are not about the model: the fit's wall time summed over resumed runs
(:class:`FitTime`) and the preemption handover of SLURM jobs (:class:`CheckpointOnPreemption`: write
``last.ckpt`` on the scheduler's signal, then requeue)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)

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
