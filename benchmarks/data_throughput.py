"""Training throughput (samples/s): the DataLoader path vs the on-device-tensor path.

Trains the same model for a few epochs on the same data, once through a DataLoader
(optionally with workers) and once with the dataset resident on the device
(``dataset.on_device=true``, augmentation batched on the device). CIFAR-10 data is
synthetic but written in the real python-batch format and read by torchvision.

    .venv/bin/python benchmarks/data_throughput.py [--n 5000] [--epochs 3] [--accelerator cpu|gpu]
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from compresslab.data import CIFAR10DataModule, DigitsDataModule
from compresslab.models import build_model
from compresslab.train import ClassifierModule


def write_fake_cifar10(root: Path, n_train: int, n_test: int = 500, seed: int = 0) -> None:
    """Random images in CIFAR-10's on-disk format (5 pickled train batches, test batch, meta)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    per = n_train // 5
    for name, count in [*[(f"data_batch_{i}", per) for i in range(1, 6)], ("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, count).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


class Throughput(Callback):
    """Samples per second over training epochs after the first."""

    def __init__(self):
        self.samples, self.seconds, self._epoch = 0, 0.0, 0

    def on_train_epoch_start(self, trainer, pl_module):
        self._start, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._n += int(batch[1].shape[0])

    def on_train_epoch_end(self, trainer, pl_module):
        if self._epoch > 0:
            self.samples += self._n
            self.seconds += time.perf_counter() - self._start
        self._epoch += 1


def measure(dm, arch: dict, epochs: int, accelerator: str) -> float:
    pl.seed_everything(0, verbose=False)
    dm.setup()
    model = build_model(arch, dm.input_shape, dm.num_classes)
    module = ClassifierModule(model, dm.num_classes, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    meter = Throughput()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[meter])
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return meter.samples / meter.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="synthetic CIFAR-10 training images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_fake_cifar10(Path(tmp), args.n)
        cases = [
            ("digits", "lenet5", lambda **kw: DigitsDataModule(batch_size=64, **kw), {"_target_": "compresslab.models.LeNet5"}),
            ("cifar10 (synthetic)", "resnet8", lambda **kw: CIFAR10DataModule(root=tmp, batch_size=128,
                                                                                verify_integrity=False, **kw),
             {"_target_": "compresslab.models.CifarResNet", "depth": 8}),
        ]
        for data_name, model_name, make, arch in cases:
            for label, kwargs in (("DataLoader, 0 workers", {"num_workers": 0, "on_device": False}),
                                  (f"DataLoader, {args.workers} workers", {"num_workers": args.workers,
                                                                           "persistent_workers": True,
                                                                           "on_device": False}),
                                  ("on-device tensors", {"on_device": True})):
                rate = measure(make(**kwargs), arch, args.epochs, args.accelerator)
                rows.append((data_name, model_name, label, rate))
    print(f"accelerator={args.accelerator} threads={torch.get_num_threads()} epochs={args.epochs} (first excluded)")
    print(f"{'data':22s} {'model':8s} {'path':24s} {'samples/s':>10s}")
    for data_name, model_name, label, rate in rows:
        print(f"{data_name:22s} {model_name:8s} {label:24s} {rate:10.0f}")


if __name__ == "__main__":
    main()
