"""Time per training epoch: compresslab's Lightning path vs a plain PyTorch loop doing the same work.

Both sides, interleaved in one process (plain, compresslab, plain, compresslab...) at 1 thread, train
the same model on the same resident tensors with the same batch size, optimizer and learning-rate
schedule (the config's: AdamW with its lr and weight decay, cosine annealing stepped per epoch); the
first epoch of each fit is warm-up and not in the median.

- **plain loop**: a user's loop. Per epoch: ``randperm`` of the training rows; per step:
  ``index_select`` of the batch, forward, ``cross_entropy``, ``zero_grad(set_to_none=True)``,
  ``backward``, ``step``; at the epoch's end the scheduler steps. It runs with the environment of a
  process that never imported Lightning (``import lightning_fabric`` sets
  ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, which makes every optimizer step probe NVML; the plain loop
  is timed without that, as a plain PyTorch process would be).
- **compresslab**: its real path at default settings: ``build_datamodule`` (``dataset.on_device=auto``:
  seeded ``randperm`` and ``index_select`` per batch), the configured module, Trainer and callbacks
  through :func:`fit_with_checkpoints` (best/last checkpoints, finiteness guard, train tally, progress
  bar and profiler as configured). An epoch is timed from its ``on_train_epoch_start`` to the next
  epoch's (or the end of training), so the end-of-epoch work (the tally's reduction, the weight check,
  the checkpoint writes, Lightning's loop between epochs) is in it; the validation loop
  (``on_validation_start`` to ``on_validation_end``) is taken out and printed apart, since the plain
  loop does not validate.

``--kd``: the same for a KD epoch (Hinton et al. 2015; the ``distill=kd`` config's temperature and
weights) with the teacher-output cache (``distill.cache_teacher_outputs=true``, epoch 2 onwards reads
the cache) against a plain loop that reads precomputed teacher logits by sample index.

``--fixed``: the fixed cost of one ``run_experiment`` (``student.epochs=1``): start to first step,
the epoch, and everything after the fit (tests, save, reload, measurement), at default settings.

    python benchmarks/lightning_overhead.py --data-root ../shared/data [--models lenet300 lenet5] [--kd] [--fixed]
    python benchmarks/lightning_overhead.py                  # digits (no files needed)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
_NVML_FLAG = "PYTORCH_NVML_BASED_CUDA_CHECK"
_NVML_BEFORE_LIGHTNING = os.environ.get(_NVML_FLAG)  # what a process without Lightning has
CLOCK = {"now": time.perf_counter}  # --clock cpu: time.process_time

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402


class EpochTimer(Callback):
    """Wall time of each training epoch (its start to the next one's, validation loop taken out) and
    of each validation loop of the fit."""

    def __init__(self):
        self.train: list[float] = []
        self.val: list[float] = []
        self._start = self._val_start = None
        self._val_total = 0.0

    def _close_epoch(self, now: float) -> None:
        if self._start is not None:
            self.train.append(now - self._start - self._val_total)
        self._start, self._val_total = None, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        now = CLOCK["now"]()
        self._close_epoch(now)
        self._start = now

    def on_train_end(self, trainer, pl_module):
        self._close_epoch(CLOCK["now"]())

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit" and self._start is not None:
            self._val_start = CLOCK["now"]()

    def on_validation_end(self, trainer, pl_module):
        if self._val_start is not None:
            took = CLOCK["now"]() - self._val_start
            self.val.append(took)
            self._val_total += took
            self._val_start = None


@contextlib.contextmanager
def without_lightning_env():
    """The plain loop runs with the NVML setting of a process that never imported Lightning."""
    now = os.environ.get(_NVML_FLAG)
    if _NVML_BEFORE_LIGHTNING is None:
        os.environ.pop(_NVML_FLAG, None)
    else:
        os.environ[_NVML_FLAG] = _NVML_BEFORE_LIGHTNING
    try:
        yield
    finally:
        if now is not None:
            os.environ[_NVML_FLAG] = now


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from compresslab.config_utils import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def setup(args, arch: str, kd: bool):
    """Config, datamodule (set up), and a teacher model (``kd``)."""
    from compresslab.config_utils import arch_spec
    from compresslab.models import build_model
    from compresslab.pipeline import build_datamodule

    data = [f"dataset={args.dataset}"] + ([f"dataset.root={args.data_root}"] if args.data_root else [])
    over = [*data, f"student={arch}", "logger=none", "measure.fresh_process=false"]
    if kd:
        over += ["distill=kd", "distill.cache_teacher_outputs=true", f"teacher={args.teacher}"]
    cfg = compose(over)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    teacher = build_model(arch_spec(cfg.teacher), dm.input_shape, dm.num_classes).eval() if kd else None
    return cfg, dm, teacher


def compresslab_epochs(cfg, dm, teacher, epochs: int, workdir: Path) -> tuple[list[float], list[float]]:
    from compresslab.config_utils import arch_spec
    from compresslab.models import build_model
    from compresslab.pipeline import _trainer_with, build_student_module, trainer_adjustments
    from compresslab.train import PerformanceOptions, fit_with_checkpoints

    pl.seed_everything(0, verbose=False)
    student = build_model(arch_spec(cfg.student), dm.input_shape, dm.num_classes)
    module = build_student_module(cfg, student, teacher, dm.num_classes)
    timer = EpochTimer()
    factory = partial(_trainer_with, cfg.trainer, [PerformanceOptions()], **trainer_adjustments(cfg.trainer))
    fit_with_checkpoints(module, dm, factory, workdir / f"ckpt{time.perf_counter_ns()}", epochs,
                         callbacks=[timer], resume=False)
    return timer.train, timer.val


def plain_epochs(cfg, dm, teacher, epochs: int, workdir: Path) -> tuple[list[float], list[float]]:
    from hydra.utils import instantiate

    from compresslab.config_utils import arch_spec
    from compresslab.data.on_device import stack_dataset
    from compresslab.models import build_model

    pl.seed_everything(0, verbose=False)
    model = build_model(arch_spec(cfg.student), dm.input_shape, dm.num_classes)
    x, y = stack_dataset(dm.train_set)
    opt = instantiate(cfg.student.optimizer)(model.parameters())
    sched = instantiate(cfg.student.scheduler)(opt) if cfg.student.get("scheduler") else None
    bs = int(cfg.dataset.batch_size)
    cached = None
    if teacher is not None:  # the teacher's logits, computed once (the cache)
        with torch.no_grad():
            cached = torch.cat([teacher(xb) for xb in x.split(512)])
        temp = float(cfg.distill.logit_loss.temperature)
        w_kd, w_ce = float(cfg.distill.kd_weight), float(cfg.distill.ce_weight)
    times = []
    model.train()
    with without_lightning_env():
        for _ in range(epochs):
            start = CLOCK["now"]()
            for b in torch.randperm(len(x)).split(bs):
                xb, yb = x.index_select(0, b), y.index_select(0, b)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                if cached is not None:
                    t = cached.index_select(0, b)
                    kd = F.kl_div(F.log_softmax(logits / temp, 1), F.log_softmax(t / temp, 1), reduction="batchmean",
                                  log_target=True) * temp ** 2
                    loss = w_ce * loss + w_kd * kd
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if sched is not None:
                sched.step()
            times.append(CLOCK["now"]() - start)
    return times, []


def compare(args, arch: str, kd: bool, workdir: Path) -> None:
    cfg, dm, teacher = setup(args, arch, kd)
    runs = {"plain": [], "compresslab": []}
    val = []
    for _ in range(args.rounds):
        for name, fn in (("plain", plain_epochs), ("compresslab", compresslab_epochs)):
            train, v = fn(cfg, dm, teacher, args.epochs, workdir)
            runs[name] += train[1:]  # first epoch: warm-up (and the cache fill for KD)
            val += v[1:]
    plain, ours = statistics.median(runs["plain"]), statistics.median(runs["compresslab"])
    what = f"KD ({args.teacher} teacher, cached logits)" if kd else "supervised"
    print(f"{args.dataset} {arch} {what}: batch={cfg.dataset.batch_size} steps/epoch={len(dm.train_dataloader())} "
          f"on_device={dm.on_device}->{dm.resident()} threads={torch.get_num_threads()}")
    print(f"  plain loop   {plain:7.3f} s/epoch   (epochs: {', '.join(f'{t:.3f}' for t in runs['plain'])})")
    print(f"  compresslab  {ours:7.3f} s/epoch   (epochs: {', '.join(f'{t:.3f}' for t in runs['compresslab'])})")
    if val:
        print(f"  compresslab validation {statistics.median(val):.3f} s/epoch (not in the ratio)")
    print(f"  ratio compresslab / plain = {ours / plain:.3f}   (medians; of the fastest epochs: "
          f"{min(runs['compresslab']) / min(runs['plain']):.3f})", flush=True)


class Stamps(Callback):
    """Wall-clock stamps of a run's first training step and of the fit's end."""

    def __init__(self):
        self.first_step = self.fit_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_step is None:
            self.first_step = time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        self.fit_end = time.perf_counter()


def fixed_cost(args, arch: str, workdir: Path) -> None:
    """Where a one-epoch run's wall time goes (default settings, fresh-process measurement included)."""
    from compresslab.pipeline import run_experiment

    data = [f"dataset={args.dataset}"] + ([f"dataset.root={args.data_root}"] if args.data_root else [])
    for fresh in ("true", "false"):
        cfg = compose([*data, f"student={arch}", "logger=none", "student.epochs=1", "teacher=none",
                       f"measure.fresh_process={fresh}", f"paths.run_dir={workdir / ('fixed' + fresh)}",
                       "trainer.enable_progress_bar=false"])
        stamps = Stamps()
        t0 = time.perf_counter()
        run_experiment(cfg, extra_callbacks=[stamps])
        end = time.perf_counter()
        print(f"fixed cost {args.dataset} {arch} (student.epochs=1, measure.fresh_process={fresh}):")
        print(f"  start -> first step  {stamps.first_step - t0:6.2f} s")
        print(f"  first step -> fit end {stamps.fit_end - stamps.first_step:6.2f} s  (the epoch + validation)")
        print(f"  after the fit        {end - stamps.fit_end:6.2f} s  (test x2, save, reload, measure)")
        print(f"  in-process total     {end - t0:6.2f} s", flush=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import compresslab.pipeline"], check=True)
    print(f"  python start + import compresslab.pipeline: {time.perf_counter() - t:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="folder holding MNIST/raw/ (default: digits, no files)")
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--teacher", default="lenet300", help="teacher arch of the KD comparison")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved plain/compresslab rounds")
    parser.add_argument("--kd", action="store_true", help="also a KD epoch with the teacher cache")
    parser.add_argument("--fixed", action="store_true", help="also the fixed cost of a 1-epoch run")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="epoch time: wall clock, or this process's CPU time (all its threads: less "
                             "disturbed by other processes on a loaded machine)")
    args = parser.parse_args()
    if args.clock == "cpu":
        CLOCK["now"] = time.process_time
    args.dataset = "mnist" if args.data_root else "digits"
    torch.set_num_threads(1)
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "compresslab"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"load: {os.getloadavg()}  clock: {args.clock}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models:
            compare(args, arch, False, Path(tmp))
        if args.kd:
            compare(args, args.models[0], True, Path(tmp))
        if args.fixed:
            fixed_cost(args, args.models[0], Path(tmp))
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
