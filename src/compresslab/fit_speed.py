"""Per-step costs of a Lightning fit that are not training, cut without changing what is trained.

Measured with ``benchmarks/lightning_overhead.py`` (LeNet-300-100 on MNIST, 1 thread: a plain loop's
step is about 3 ms, so every 0.1 ms is 3 %):

- :class:`TimedProgressBar`, the default bar of every project fit (:func:`default_fit_kwargs`): Lightning's
  default (``RichProgressBar`` when ``rich`` is installed) updates its task and metrics on every step;
  this tqdm bar redraws at most every ``min_interval_s`` seconds and at each bar's end.
- :class:`HookProfiler`: Lightning wraps every hook call (about 100 per step with the project's
  callbacks) in ``trainer.profiler.profile(...)``, a generator context manager even when nothing
  profiles; this one hands back one shared no-op context. Used unless ``trainer.profiler`` is set.
- :func:`skip_noop_hooks`: Lightning calls every callback's per-step hooks (about 60 calls per step
  with the project's ten callbacks, each with a profiler context and a name string) and the module's,
  most of them the base class's no-ops; it skips an attribute that is not callable, so the no-ops are
  set to ``None`` on the instance.
- :func:`manual_step_supported` and :class:`EpochSchedulerSteps`: Lightning's automatic optimization runs
  each step through a closure, the ``optimizer_step``/``optimizer_zero_grad`` module hooks and their
  wrappers (about 0.2 ms a step on a CPU); a :class:`~compresslab.train.ClassifierModule` steps its
  optimizer in ``training_step`` instead, and this callback steps its epoch scheduler, wherever the
  fit does not need the automatic loop.
- :func:`no_failing_nvml_probe`: ``import lightning_fabric`` sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1``,
  and torch's optimizers ask ``torch.cuda.is_available()`` on every ``step()``; on a machine without
  NVML that tries to ``dlopen`` ``libnvidia-ml.so.1`` on every step (about 0.2–0.5 ms), fails, and
  falls back to the CUDA runtime's count. Where the library cannot be loaded the fit asks the CUDA
  runtime directly: the same answer.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
import time
from typing import Any, Iterator

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.core.hooks import ModelHooks
from pytorch_lightning.profilers import PassThroughProfiler
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

_NVML_FLAG = "PYTORCH_NVML_BASED_CUDA_CHECK"
# Per-batch hooks whose return value Lightning does not use (on_train_batch_start's -1 is checked
# with ==, so None means "go on"); hooks that return a batch or a loss are never touched.
STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
              "on_before_optimizer_step", "on_before_zero_grad", "on_validation_batch_start",
              "on_validation_batch_end", "on_test_batch_start", "on_test_batch_end", "on_predict_batch_start",
              "on_predict_batch_end")
# The module's training-step hooks only: Lightning reads the signatures of the module's
# validation/test/predict batch hooks (their dataloader_idx), so those stay methods.
MODULE_STEP_HOOKS = STEP_HOOKS[:6]


class TimedProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, redrawn at most every ``min_interval_s`` seconds and at the end
    of each bar (default: 0.5 s in a terminal, 30 s when the output is a file or pipe, where every
    redraw is a line of log)."""

    def __init__(self, min_interval_s: float | None = None, refresh_rate: int = 1, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        if min_interval_s is None:
            min_interval_s = 0.5 if sys.stdout.isatty() else 30.0
        self.min_interval_s = float(min_interval_s)
        self._last_draw = -math.inf

    def _should_update(self, current: int, total: int) -> bool:
        if not self.is_enabled:
            return False
        now = time.monotonic()
        if current == total or (current % self.refresh_rate == 0 and now - self._last_draw >= self.min_interval_s):
            self._last_draw = now
            return True
        return False


class HookProfiler(PassThroughProfiler):
    """Lightning's default (no-op) profiler whose ``profile()`` returns one shared no-op context
    instead of building a generator context manager for each of a step's ~100 hook calls."""

    _NULL = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:  # type: ignore[override]
        return self._NULL


def skip_noop_hooks(objects: list) -> list:
    """Set each per-batch hook that a callback (:data:`STEP_HOOKS`) or LightningModule
    (:data:`MODULE_STEP_HOOKS`) in ``objects`` inherits unchanged from Lightning's no-op base
    (``Callback``, ``ModelHooks``) to ``None`` on the instance: Lightning's hook dispatch skips a
    non-callable attribute, so the call it would make does nothing either way. Overridden hooks are
    left alone. Returns ``objects``."""
    for obj in objects:
        if isinstance(obj, Callback):
            base, hooks = Callback, STEP_HOOKS
        elif isinstance(obj, ModelHooks):
            base, hooks = ModelHooks, MODULE_STEP_HOOKS
        else:
            continue
        for name in hooks:
            if getattr(type(obj), name, None) is getattr(base, name) and name not in vars(obj):
                setattr(obj, name, None)
    return objects


def manual_step_supported(trainer: pl.Trainer) -> bool:
    """Whether a fit on ``trainer`` can step the optimizer in ``training_step`` (Lightning's manual
    optimization): not where the trainer clips gradients or accumulates them over batches, which only
    the automatic loop does (Lightning refuses both settings with manual optimization)."""
    clip = trainer.gradient_clip_val
    return not (clip is not None and clip > 0) and trainer.accumulate_grad_batches == 1


class EpochSchedulerSteps(Callback):
    """Steps the epoch-interval learning-rate schedulers of a module that steps its own optimizer
    (Lightning steps them only for automatic optimization): once at the end of every training epoch, as
    the automatic loop does. A fit resumed from a checkpoint written at the epoch's end (after this
    step) or at the end of its validation (before it: Lightning then runs the epoch's end again) goes on
    with the schedule of an uninterrupted one. Does nothing for an automatically optimized module."""

    @staticmethod
    def can_step(scheduler: Any) -> bool:
        """Whether the scheduler is stepped by count alone (not a plateau scheduler, which needs a metric)."""
        return isinstance(scheduler, LRScheduler) and not isinstance(scheduler, ReduceLROnPlateau)

    @staticmethod
    def _epoch_schedulers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list:
        if pl_module.automatic_optimization:
            return []
        return [config.scheduler for config in trainer.lr_scheduler_configs if config.interval == "epoch"]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for scheduler in self._epoch_schedulers(trainer, pl_module):
            scheduler.step()


def default_fit_kwargs(trainer_cfg: Any, callbacks: list, overrides: dict | None = None) -> dict:
    """Trainer arguments every project fit gets unless its settings (``trainer_cfg`` with ``overrides``
    on top) say otherwise: the :class:`HookProfiler` when ``profiler`` is unset, and the
    :class:`TimedProgressBar` appended to ``callbacks`` (returned as ``callbacks``) when the bar is on
    and no progress bar is among them."""
    from pytorch_lightning.callbacks.progress import ProgressBar

    overrides = overrides or {}

    def setting(key: str, default: Any = None) -> Any:
        return overrides[key] if key in overrides else trainer_cfg.get(key, default)

    out: dict = {"callbacks": list(callbacks)}
    if setting("profiler") is None:
        out["profiler"] = HookProfiler()
    if setting("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        out["callbacks"].append(TimedProgressBar())
    return out


@functools.cache
def nvml_loadable() -> bool:
    """Whether ``libnvidia-ml.so.1``, the library torch's NVML-based CUDA check loads, can be loaded."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def no_failing_nvml_probe() -> Iterator[None]:
    """Within the block, ``torch.cuda.is_available()`` asks the CUDA runtime directly when NVML cannot
    be loaded (torch's NVML path would fail to load it and ask the runtime anyway); the variable is
    restored afterwards. Does nothing where NVML loads (GPU machines keep Lightning's setting)."""
    before = os.environ.get(_NVML_FLAG)
    if before != "1" or nvml_loadable():
        yield
        return
    os.environ[_NVML_FLAG] = "0"
    try:
        yield
    finally:
        os.environ[_NVML_FLAG] = before
