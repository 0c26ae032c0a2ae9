"""Datasets that need no download: scikit-learn's digits and the generated MNIST-1D."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import TensorDataset

from compresslab.data.base import ClassificationDataModule
from compresslab.data.options import check_dataset_options


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mean, std = float(train.mean()), float(train.std()) or 1.0
    return [torch.as_tensor((a - mean) / std, dtype=torch.float32) for a in (train, *others)]


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), shipped in the package.

    The test split is a fixed stratified 20% (``test_fraction``, seed 0) so every
    run and seed is scored on the same images.
    """

    name = "digits"
    array_backed = True
    input_shape = (1, 8, 8)
    num_classes = 10

    def __init__(self, test_fraction: float = 0.2, **kwargs) -> None:
        check_dataset_options(test_fraction=test_fraction)  # sklearn's message would say test_size
        super().__init__(**kwargs)
        self.test_fraction = float(test_fraction)
        self._arrays: tuple | None = None

    def _load(self):
        if self._arrays is None:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            digits = load_digits()
            x = digits.images.astype(np.float32) / 16.0
            y = digits.target.astype(np.int64)
            x_tr, x_te, y_tr, y_te = train_test_split(
                x, y, test_size=self.test_fraction, stratify=y, random_state=0
            )
            x_tr, x_te = _standardize(x_tr, x_te)
            self._arrays = (
                TensorDataset(x_tr.unsqueeze(1), torch.as_tensor(y_tr)),
                TensorDataset(x_te.unsqueeze(1), torch.as_tensor(y_te)),
            )
        return self._arrays

    def _train_dataset(self):
        return self._load()[0]

    def _test_dataset(self):
        return self._load()[1]


class MNIST1DDataModule(ClassificationDataModule):
    """MNIST-1D (Greydanus 2020), generated locally with the mnist1d package's defaults.

    Never uses the package's download path: the data is generated from its
    templates with the default arguments (5000 sequences of length 40, 80/20
    train/test) and cached as ``<root>/mnist1d/mnist1d_default.npz``.
    """

    name = "mnist1d"
    array_backed = True
    num_classes = 10

    def __init__(self, num_samples: int = 5000, **kwargs) -> None:
        check_dataset_options(num_samples=num_samples)
        super().__init__(**kwargs)
        self.num_samples = int(num_samples)
        self._sets: tuple | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (1, 40)

    @property
    def cache_path(self) -> Path:
        suffix = "default" if self.num_samples == 5000 else f"n{self.num_samples}"
        return self.root / "mnist1d" / f"mnist1d_{suffix}.npz"

    def _generate(self) -> dict:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = self.num_samples
        data = make_dataset(args)
        return {k: data[k] for k in ("x", "y", "x_test", "y_test")}

    def _arrays(self) -> dict:
        path = self.cache_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, **self._generate())
                tmp.replace(path)
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def _load(self):
        if self._sets is None:
            a = self._arrays()
            x_tr, x_te = _standardize(a["x"].astype(np.float32), a["x_test"].astype(np.float32))
            self._sets = (
                TensorDataset(x_tr.unsqueeze(1), torch.as_tensor(a["y"], dtype=torch.long)),
                TensorDataset(x_te.unsqueeze(1), torch.as_tensor(a["y_test"], dtype=torch.long)),
            )
        return self._sets

    def _train_dataset(self):
        return self._load()[0]

    def _test_dataset(self):
        return self._load()[1]
