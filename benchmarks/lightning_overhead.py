"""Time per training epoch: compresslab's Lightning path vs a plain PyTorch loop doing the same work.

Same model, data, batch size, optimizer; no validation, checkpointing or logging in
either, so the difference is the framework's per-step overhead. Usage:

    .venv/bin/python benchmarks/lightning_overhead.py [--model convnet] [--epochs 6] [--dataset digits]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

from compresslab.data import DigitsDataModule, MNIST1DDataModule
from compresslab.models import build_model
from compresslab.train import ClassifierModule

ARCHS = {
    "convnet": {"_target_": "compresslab.models.ConvNet", "channels": [32, 64]},
    "lenet5": {"_target_": "compresslab.models.LeNet5"},
    "mlp": {"_target_": "compresslab.models.MLP", "hidden": [300, 100]},
    "cnn1d": {"_target_": "compresslab.models.CNN1D", "channels": [64, 64, 64]},
}


class EpochTimer(Callback):
    """Wall time of each training epoch."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._start)


def lightning_epochs(model, dm, epochs: int) -> list[float]:
    module = ClassifierModule(model, dm.num_classes, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return timer.times


def plain_epochs(model, dm, epochs: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    times = []
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in dm.train_dataloader():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnet", choices=sorted(ARCHS))
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist1d"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    dm_cls = DigitsDataModule if args.dataset == "digits" else MNIST1DDataModule
    dm = dm_cls(batch_size=args.batch_size, root="data")
    dm.setup()
    results = {}
    for name, fn in (("plain", plain_epochs), ("lightning", lightning_epochs), ("plain (again)", plain_epochs)):
        pl.seed_everything(0, verbose=False)
        model = build_model(ARCHS[args.model], dm.input_shape, dm.num_classes)
        times = fn(model, dm, args.epochs)[1:]  # first epoch is warm-up
        results[name] = statistics.median(times)
    plain = min(results["plain"], results["plain (again)"])
    print(f"dataset={args.dataset} model={args.model} batch={args.batch_size} threads={torch.get_num_threads()} "
          f"steps/epoch={len(dm.train_dataloader())}")
    for name, t in results.items():
        print(f"  {name:14s} {t * 1e3:8.1f} ms/epoch")
    print(f"  lightning / plain = {results['lightning'] / plain:.3f}")


if __name__ == "__main__":
    main()
