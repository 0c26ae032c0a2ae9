"""Time per training epoch: compresslab's Lightning path vs a plain PyTorch loop doing the same work.

Same model, data, batch size and optimizer (the config's: AdamW 3e-3, batch from the dataset
config), 1 thread, interleaved in one process (plain, compresslab, plain, compresslab...); the
first epoch of each fit is warm-up. compresslab runs its real path at default settings:
``build_datamodule`` (``dataset.on_device=auto``), the configured module and Trainer with
:func:`fit_with_checkpoints` (best/last checkpoints, progress bar and logging as configured); its
epoch is timed from the epoch's start to the start of validation, and validation is printed apart.
The plain loop shuffles the same resident tensors with ``randperm`` and steps
``cross_entropy → zero_grad → backward → step``.

``--kd``: the same for a KD epoch (Hinton et al. 2015) with the teacher-output cache
(``distill=kd distill.cache_teacher_outputs=true``, epoch 2 onwards reads the cache) against a plain
loop that reads precomputed teacher logits by sample index.

``--fixed``: the fixed cost of one ``run_experiment`` (``student.epochs=1``): start to first step,
the epoch, and everything after the fit (tests, save, reload, measurement), at default settings.

    python benchmarks/lightning_overhead.py --data-root ../shared/data [--models lenet300 lenet5] [--kd] [--fixed]
    python benchmarks/lightning_overhead.py                  # digits (no files needed)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402


class EpochTimer(Callback):
    """Wall time of each training epoch up to validation, and of each validation."""

    def __init__(self):
        self.train: list[float] = []
        self.val: list[float] = []
        self._start = self._val_start = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.state.fn == "fit" and self._start is not None:
            self._val_start = time.perf_counter()
            self.train.append(self._val_start - self._start)
            self._start = None

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._val_start is not None:
            self.val.append(time.perf_counter() - self._val_start)
            self._val_start = None

    def on_train_epoch_end(self, trainer, pl_module):
        if self._start is not None:  # no validation this epoch
            self.train.append(time.perf_counter() - self._start)
            self._start = None


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
    from compresslab.data.on_device import stack_dataset
    from compresslab.config_utils import arch_spec
    from compresslab.models import build_model

    pl.seed_everything(0, verbose=False)
    model = build_model(arch_spec(cfg.student), dm.input_shape, dm.num_classes)
    x, y = stack_dataset(dm.train_set)
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.student.optimizer.lr))
    bs = int(cfg.dataset.batch_size)
    cached = None
    if teacher is not None:  # the teacher's logits, computed once (the cache)
        with torch.no_grad():
            cached = torch.cat([teacher(xb) for xb in x.split(512)])
        temp, w_kd, w_ce = 4.0, 0.9, 0.1
    times = []
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
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
        times.append(time.perf_counter() - start)
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
    print(f"  ratio compresslab / plain = {ours / plain:.3f}", flush=True)


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
    args = parser.parse_args()
    args.dataset = "mnist" if args.data_root else "digits"
    torch.set_num_threads(1)
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "compresslab"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"load: {os.getloadavg()}")
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
