"""torchvision-backed datamodules: MNIST, Fashion-MNIST, CIFAR-10/100 (ImageNet-style folders: :mod:`.folder`).

The samples are read by torchvision's own dataset classes from their usual
on-disk layout under ``root``:

* MNIST:          ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
* Fashion-MNIST:  ``<root>/FashionMNIST/raw/...`` (same file names)
* CIFAR-10:       ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
* CIFAR-100:      ``<root>/cifar-100-python/{train,test,meta}``
* ImageFolder:    ``<root>/<train_dir>/<class>/<image>`` and ``<root>/<test_dir>/<class>/<image>``

torchvision is asked to download only in :meth:`prepare_data` and only when
``download=true``; otherwise missing files raise :class:`DatasetNotFoundError`
(naming the path and ``dataset.download=true``) before any training starts.
"""

from __future__ import annotations

import copy
import os
from abc import abstractmethod
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.vision import StandardTransform

from compresslab.data.base import ArrayDataset, ClassificationDataModule
from compresslab.data.checks import CIFAR10Unverified, CIFAR100Unverified, check_idx_pair
from compresslab.errors import DatasetNotFoundError

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# The statistics RepDistiller (Tian et al. 2020) normalizes CIFAR-100 with.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def with_transform(dataset: Dataset, transform: Callable | None) -> Dataset:
    """A shallow copy of a torchvision dataset with another ``transform``.

    The copy shares the loaded arrays / sample list, so the train split is read
    from disk once and served with both the train and the eval transform.
    """
    out = copy.copy(dataset)
    out.transform = transform
    if hasattr(out, "transforms"):
        out.transforms = StandardTransform(transform, getattr(out, "target_transform", None))
    return out


class _SharedTrainFiles(ClassificationDataModule):
    """One untransformed training set, loaded once and viewed twice: with the training transform
    (the train split) and with the eval transform (the validation split carved from it)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._train_base: Dataset | None = None

    @abstractmethod
    def _load_train_base(self) -> Dataset:
        """The training files as a dataset without transform."""

    def _base_train(self) -> Dataset:
        if self._train_base is None:
            self._train_base = self._load_train_base()
        return self._train_base

    def _train_dataset(self) -> Dataset:
        return with_transform(self._base_train(), self.train_transform())

    def _train_dataset_for_eval(self) -> Dataset:
        return with_transform(self._base_train(), self.eval_transform())


class _TorchvisionDataModule(_SharedTrainFiles):
    """Shared logic for torchvision datasets built as ``cls(root, train=..., transform=..., download=...)``."""

    dataset_cls: type = datasets.VisionDataset
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    # ---- transforms -----------------------------------------------------
    def _normalize(self) -> list:
        return [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]

    def train_transform(self) -> Callable:
        return transforms.Compose(self._normalize())

    def eval_transform(self) -> Callable:
        return transforms.Compose(self._normalize())

    # ---- torchvision ------------------------------------------------------
    def _dataset_class(self) -> type:
        return self.dataset_cls

    array_backed = True

    def decoded(self, dataset: Dataset) -> ArrayDataset:
        """The whole split decoded once from torchvision's uint8 array (``.data``: N×H×W or N×H×W×C)
        and normalized as ``ToTensor`` + ``Normalize`` do to each sample: the eval-transform view."""
        data = torch.as_tensor(dataset.data)
        x = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = x.float().div_(255).sub_(mean).div_(std).contiguous()
        return ArrayDataset(x, torch.as_tensor(dataset.targets), classes=getattr(dataset, "classes", ()))

    def _train_dataset(self) -> Dataset:
        if self.has_augmentation:  # the DataLoader path: torchvision's per-sample random transform
            return super()._train_dataset()
        return self._train_dataset_for_eval()

    def _train_dataset_for_eval(self) -> Dataset:
        if getattr(self, "_train_decoded", None) is None:
            self._train_decoded = self.decoded(self._base_train())
        return self._train_decoded

    def _make(self, train: bool, transform: Callable | None) -> Dataset:
        try:
            return self._dataset_class()(str(self.root), train=train, transform=transform, download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted ..."
            raise DatasetNotFoundError(self._unreadable_message(e)) from e

    def _unreadable_message(self, err: Exception) -> str:
        return (
            f"Dataset '{self.name}' under {self.root.resolve()} could not be loaded by torchvision: {err} "
            f"Set dataset.root=<dir with the files>, or dataset.download=true on a machine with internet."
        )

    def prepare_data(self) -> None:
        self.check_available()
        if not self.download:
            return
        cls = self._dataset_class()
        for train in (True, False):
            try:
                cls(str(self.root), train=train, download=True)
            except (RuntimeError, OSError) as e:
                raise DatasetNotFoundError(
                    f"Downloading dataset '{self.name}' into {self.root.resolve()} failed: {e}. "
                    f"Put the files there by hand ({', '.join(str(p) for p in self.expected_files()[:3])}, ...) "
                    f"and set dataset.download=false."
                ) from e

    def _load_train_base(self) -> Dataset:
        return self._make(True, None)

    def _test_dataset(self) -> Dataset:
        return self.decoded(self._make(False, None))


# ---- MNIST family ------------------------------------------------------------
class MNISTDataModule(_TorchvisionDataModule):
    """MNIST (28x28 grayscale, 10 classes) read by ``torchvision.datasets.MNIST``; no augmentation."""

    name = "mnist"
    input_shape = (1, 28, 28)
    num_classes = 10
    dataset_cls = datasets.MNIST
    mean, std = MNIST_MEAN, MNIST_STD

    @property
    def raw_folder(self) -> Path:
        # torchvision: <root>/<class name>/raw (MNIST, FashionMNIST)
        return self.root / self.dataset_cls.__name__ / "raw"

    def _make(self, train: bool, transform: Callable | None) -> Dataset:
        prefix = "train" if train else "t10k"
        images, labels = (self.raw_folder / f"{prefix}-{k}-ubyte" for k in ("images-idx3", "labels-idx1"))
        if images.is_file() and labels.is_file():  # the files torchvision reads (not the legacy .pt cache)
            check_idx_pair(images, labels, self.input_shape[1:])
        return super()._make(train, transform)

    def expected_files(self) -> Sequence[Path]:
        # torchvision first accepts the legacy processed/{training,test}.pt cache.
        processed = self.root / self.dataset_cls.__name__ / "processed"
        legacy = [processed / self.dataset_cls.training_file, processed / self.dataset_cls.test_file]
        if all(p.is_file() for p in legacy):
            return legacy
        # MNIST._check_exists: the uncompressed name of every resource in raw/.
        return [self.raw_folder / os.path.splitext(os.path.basename(url))[0] for url, _ in self.dataset_cls.resources]


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (28x28 grayscale, 10 classes) read by ``torchvision.datasets.FashionMNIST``."""

    name = "fashion_mnist"
    dataset_cls = datasets.FashionMNIST
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD


# ---- CIFAR -------------------------------------------------------------------
class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 (32x32 RGB, 10 classes) read by ``torchvision.datasets.CIFAR10``.

    Training transform: RandomCrop(32, padding=4) + RandomHorizontalFlip (when
    ``augment``) + ToTensor + Normalize; eval: ToTensor + Normalize.

    ``verify_integrity`` (default true) keeps torchvision's md5 comparison of
    every batch file with the official release. Set it to false only to load
    files in the CIFAR format that are not the official ones (a re-packed or
    sub-sampled copy, test fixtures): the files are then only required to exist.
    """

    name = "cifar10"
    input_shape = (3, 32, 32)
    num_classes = 10
    dataset_cls = datasets.CIFAR10
    unverified_cls = CIFAR10Unverified
    mean, std = CIFAR10_MEAN, CIFAR10_STD

    def __init__(self, verify_integrity: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.verify_integrity = bool(verify_integrity)
        self.has_augmentation = self.augment

    def _dataset_class(self) -> type:
        return self.dataset_cls if self.verify_integrity else self.unverified_cls

    def train_transform(self) -> Callable:
        aug = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if self.augment else []
        return transforms.Compose(aug + self._normalize())

    def device_augment(self, x: torch.Tensor) -> torch.Tensor:
        """RandomCrop(32, padding=4) + horizontal flip, batched on the device (``on_device=true``)."""
        from compresslab.data.on_device import random_crop_flip

        pad_value = -torch.tensor(self.mean) / torch.tensor(self.std)
        return random_crop_flip(x, padding=4, pad_value=pad_value)

    def expected_files(self) -> Sequence[Path]:
        cls = self.dataset_cls
        folder = self.root / cls.base_folder
        return [folder / name for name, _ in cls.train_list + cls.test_list] + [folder / cls.meta["filename"]]

    def _unreadable_message(self, err: Exception) -> str:
        if any(not Path(p).is_file() for p in self.expected_files()):
            return super()._unreadable_message(err)
        return (
            f"Dataset '{self.name}' under {(self.root / self.dataset_cls.base_folder).resolve()} could not be "
            f"loaded by torchvision: {err} The files exist, so they differ from the official release (md5). "
            f"Re-fetch them with dataset.download=true (delete the folder first), or set "
            f"dataset.verify_integrity=false to load a non-official copy in the same format."
        )


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (32x32 RGB, 100 fine classes) read by ``torchvision.datasets.CIFAR100``."""

    name = "cifar100"
    num_classes = 100
    dataset_cls = datasets.CIFAR100
    unverified_cls = CIFAR100Unverified
    mean, std = CIFAR100_MEAN, CIFAR100_STD
