"""Shared LightningDataModule logic: a train/val/test split with val carved from train."""

from __future__ import annotations

import copy
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from compresslab.data.options import check_dataset_options
from compresslab.data.regime import RegimeSubset, dataset_targets, regime_values, student_split
from compresslab.errors import ConfigError, DatasetNotFoundError

#: ``on_device=auto`` keeps a dataset resident on the CPU when its splits take at most this share of
#: the machine's memory (and at most :data:`CPU_RESIDENT_CAP` bytes); on a GPU, half its free memory.
CPU_RESIDENT_SHARE, CPU_RESIDENT_CAP = 0.25, 4 << 30


class ArrayDataset(TensorDataset):
    """Samples decoded once into two tensors (inputs as the eval transform gives them, long labels);
    ``classes`` names the labels, ``targets`` is the label tensor (as on torchvision datasets)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: Sequence[str] = ()) -> None:
        super().__init__(x, y.long())
        self.classes = list(classes)

    @property
    def targets(self) -> torch.Tensor:
        return self.tensors[1]


def parse_on_device(value) -> bool | str:
    """``dataset.on_device``: true, false or "auto"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        v = value.strip().lower()
        return "auto" if v == "auto" else v == "true"
    raise ConfigError(f"dataset.on_device must be true, false or auto, got {value!r}")


def _memory_budget(device: torch.device) -> float:
    if device.type == "cuda":
        return 0.5 * torch.cuda.mem_get_info(device)[0]
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return min(CPU_RESIDENT_CAP, CPU_RESIDENT_SHARE * total)


class IndexedDataset(Dataset):
    """A dataset whose items also carry their index: ``(*item, index)``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i):
        return (*self.base[i], i)


class ClassificationDataModule(pl.LightningDataModule, ABC):
    """Base datamodule for image/sequence classification.

    Subclasses implement :meth:`_train_dataset` (with training augmentation),
    :meth:`_train_dataset_for_eval` (same samples, eval transform) and
    :meth:`_test_dataset`, and set ``input_shape`` (without batch dim) and
    ``num_classes``. The validation split is a fixed-seed random subset of the
    training set (``val_fraction``, ``split_seed``), evaluated without augmentation.

    The student's regime (see :mod:`compresslab.data.regime`) narrows the training split that
    remains: ``train_fraction`` (a class-stratified subset seeded by ``subset_seed``),
    ``exclude_classes`` (labels removed), ``unlabeled_fraction`` (labels hidden, the samples kept
    for soft targets). Validation and test are never narrowed; :meth:`full_split_view` is the
    same data without the regime (what the teacher trains on).

    ``with_index``: the training loader yields ``(x, y, index)``, ``index`` the sample's position in
    ``train_set`` (a teacher-output cache and CRD's memory bank look samples up by it). A distillation
    module that needs it switches it on for its fit.

    ``on_device`` (true / false / "auto"): serve batches from tensors resident on the training device
    (:class:`~compresslab.data.on_device.TensorBatches`, augmentation batched by
    :meth:`device_augment`) instead of a DataLoader. "auto" (the default) does so for array-backed
    datasets (``array_backed``: the samples are decoded once into tensors) whose splits fit the
    memory budget (:data:`CPU_RESIDENT_SHARE`); image folders keep the DataLoader with workers.
    """

    name: str = "dataset"
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0
    #: True when the training transform is random (crop/flip...): per-sample
    #: caches of teacher outputs are then invalid.
    has_augmentation: bool = False
    #: True when the splits are held as decoded tensors (:class:`ArrayDataset`): ``on_device=auto``
    #: batches them as tensors.
    array_backed: bool = False

    def __init__(
        self,
        root: str | Path = "data",
        download: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        augment: bool = True,
        on_device: bool | str = "auto",
        train_fraction: float = 1.0,
        subset_seed: int = 0,
        exclude_classes: Sequence[int] | None = None,
        unlabeled_fraction: float = 0.0,
        with_index: bool = False,
    ) -> None:
        super().__init__()
        if exclude_classes is not None and not isinstance(exclude_classes, (int, str)):
            exclude_classes = list(exclude_classes)
        check_dataset_options(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                              val_fraction=val_fraction, split_seed=split_seed, train_fraction=train_fraction,
                              subset_seed=subset_seed, exclude_classes=exclude_classes,
                              unlabeled_fraction=unlabeled_fraction)
        (self.train_fraction, self.exclude_classes, self.unlabeled_fraction,
         self.subset_seed) = regime_values(train_fraction, exclude_classes, unlabeled_fraction, subset_seed)
        self.root = Path(root)
        self.download = bool(download)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.augment = bool(augment)
        self.on_device = parse_on_device(on_device)
        self.with_index = bool(with_index)
        self._resident: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ---- to implement -------------------------------------------------
    @abstractmethod
    def _train_dataset(self) -> Dataset:
        """The training samples with the training transform."""

    def _train_dataset_for_eval(self) -> Dataset:
        return self._train_dataset()

    @abstractmethod
    def _test_dataset(self) -> Dataset:
        """The test split with the eval transform."""

    def expected_files(self) -> Sequence[Path]:
        """Files whose absence means the dataset is not on disk (empty: always available)."""
        return ()

    # ---- shared -------------------------------------------------------
    def check_available(self) -> None:
        """Fail early, naming the path and the download option, when files are missing."""
        if self.download:
            return
        self.refuse_missing([p for p in self.expected_files() if not Path(p).exists()],
                            "Set dataset.root=<dir with the files>, or dataset.download=true on a machine with internet.")

    def refuse_missing(self, missing: Sequence[Path], what_to_do: str) -> None:
        """:class:`DatasetNotFoundError` naming the dataset, its root, the first missing paths and the way out."""
        if missing:
            raise DatasetNotFoundError(f"Dataset '{self.name}' not found under {self.root.resolve()} "
                                       f"(missing: {', '.join(str(m) for m in missing[:3])}). {what_to_do}")

    def prepare_data(self) -> None:
        self.check_available()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.check_available()
        train_aug = self._train_dataset()
        train_eval = self._train_dataset_for_eval()
        n = len(train_aug)
        n_val = max(1, int(round(n * self.val_fraction)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        self.val_indices = sorted(perm[:n_val])
        self.full_train_indices = sorted(perm[n_val:])
        if self.has_student_regime:
            pool = self.full_train_indices
            labels = dataset_targets(train_eval)[torch.as_tensor(pool, dtype=torch.long)]
            self.train_indices, self.unlabeled_indices = student_split(
                pool, labels, self.num_classes, self.train_fraction, self.exclude_classes,
                self.unlabeled_fraction, self.subset_seed, self.name)
        else:
            self.train_indices, self.unlabeled_indices = self.full_train_indices, []
        self.train_set = self._student_train(train_aug)
        self.val_set = Subset(train_eval, self.val_indices)
        self.test_set = self._test_dataset()

    @property
    def has_student_regime(self) -> bool:
        """Whether the student's training split is narrower than the full training split."""
        return self.train_fraction < 1.0 or bool(self.exclude_classes) or self.unlabeled_fraction > 0.0

    def _student_train(self, dataset: Dataset) -> Dataset:
        if not self.unlabeled_indices:
            return Subset(dataset, self.train_indices)
        return RegimeSubset(dataset, self.train_indices, self.unlabeled_indices)

    def full_split_view(self) -> "ClassificationDataModule":
        """This datamodule without the student's regime: the full training split with every label
        (the teacher trains on it). Shares the loaded files; ``self`` when there is no regime."""
        if not self.has_student_regime:
            return self
        view = copy.copy(self)
        view.train_fraction, view.exclude_classes, view.unlabeled_fraction = 1.0, [], 0.0
        view._resident = {}
        view.train_set = view.val_set = view.test_set = None
        view.setup()
        return view

    def regime_summary(self) -> dict:
        """Sizes of the splits and what the regime removed (for results.json)."""
        return {
            "train_fraction": self.train_fraction, "subset_seed": self.subset_seed,
            "exclude_classes": list(self.exclude_classes), "unlabeled_fraction": self.unlabeled_fraction,
            "full_train_samples": len(self.full_train_indices), "train_samples": len(self.train_indices),
            "labelled_train_samples": len(self.train_indices) - len(self.unlabeled_indices),
            "val_samples": len(self.val_indices), "test_samples": len(self.test_set),
        }

    def device_augment(self, x: torch.Tensor) -> torch.Tensor:
        """The training augmentation as a batched tensor op (for ``on_device``); identity by default."""
        return x

    def _device_and_shard(self) -> tuple[torch.device, int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return torch.device("cpu"), 0, 1
        return trainer.strategy.root_device, trainer.global_rank, trainer.world_size

    def resident(self) -> bool:
        """Whether batches come from resident tensors (``on_device`` resolved; see the class doc)."""
        if self.on_device != "auto":
            return bool(self.on_device)
        if not self.array_backed or self.train_set is None:
            return False
        n = len(self.train_set) + len(self.val_set) + len(self.test_set)
        return n * math.prod(self.input_shape) * 4 <= _memory_budget(self._device_and_shard()[0])

    def _resident_batches(self, split: str, shuffle: bool, batch_size: int):
        from compresslab.data.on_device import TensorBatches, stack_dataset

        device, rank, world = self._device_and_shard()
        if split not in self._resident:
            source = {"train": self._student_train(self._train_dataset_for_eval()),
                      "val": self.val_set, "test": self.test_set}[split]
            self._resident[split] = stack_dataset(source, device)
        x, y = self._resident[split]
        augment = self.device_augment if split == "train" and self.has_augmentation else None
        if split != "train":  # every rank evaluates its own shard; metrics are synced
            shuffle = False
        # the shuffle order follows the run's seed (torch's initial seed: seed_everything's, alike on every rank)
        seed = (torch.initial_seed() + self.split_seed) % 2**62 if shuffle else 0
        return TensorBatches(x, y, batch_size, shuffle, augment=augment, seed=seed, rank=rank, world=world,
                             with_index=split == "train" and self.with_index)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """A batch of tensors already on ``device`` (``on_device``) as it is (Lightning's generic move
        walks and copies the collection each step); others as Lightning does."""
        if isinstance(batch, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if self.resident():
            return self._resident_batches(split, shuffle, batch_size)
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        if split == "train" and self.with_index:
            dataset = IndexedDataset(dataset)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def example_batch(self, batch_size: int = 1) -> torch.Tensor:
        """A batch of real test inputs, for latency and MAC measurement."""
        xs = [self.test_set[i][0] for i in range(min(batch_size, len(self.test_set)))]
        x = torch.stack(xs)
        if x.shape[0] < batch_size:  # tiny test sets: repeat to reach the batch size
            reps = -(-batch_size // x.shape[0])
            x = x.repeat(reps, *([1] * (x.dim() - 1)))[:batch_size]
        return x

    def describe(self) -> dict:
        """What a model builder and results.json need to know about the data."""
        return {"name": self.name, "input_shape": list(self.input_shape), "num_classes": self.num_classes}
