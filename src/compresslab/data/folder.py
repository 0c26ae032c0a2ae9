"""ImageNet-style folders (``<root>/<train_dir>/<class>/<image>``) read by ``torchvision.datasets.ImageFolder``,
served by a DataLoader with workers (the images are decoded per sample, with random crops)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from compresslab.data.checks import check_image_tree, checked_loader, verify_images
from compresslab.data.vision import IMAGENET_MEAN, IMAGENET_STD, _SharedTrainFiles
from compresslab.errors import ConfigError


# ---- ImageNet-style folders --------------------------------------------------
class ImageFolderDataModule(_SharedTrainFiles):
    """``<root>/<train_dir>/<class>/*.jpg`` + ``<root>/<test_dir>/<class>/*.jpg`` via ``torchvision.datasets.ImageFolder``.

    The ImageNet recipe: RandomResizedCrop(image_size) + RandomHorizontalFlip
    for training (when ``augment``), Resize(resize_size, default
    image_size/0.875) + CenterCrop(image_size) for evaluation, ImageNet
    normalization. ``num_classes`` is the number of class folders in the train
    dir (read on first use); the test dir must hold the same class folders.
    Nothing can be downloaded: the tree must already be on disk.
    """

    name = "imagefolder"
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        train_dir: str = "train",
        test_dir: str = "val",
        image_size: int = 224,
        resize_size: int | None = None,
        name: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.train_dir = self.root / train_dir
        self.test_dir = self.root / test_dir
        self.image_size = int(image_size)
        self.resize_size = int(resize_size) if resize_size else int(round(self.image_size / 0.875))
        if name:
            self.name = str(name)
        self.has_augmentation = self.augment
        self._classes: list[str] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (3, self.image_size, self.image_size)

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            self.check_available()
            check_image_tree(self.train_dir)
            self._classes = datasets.folder.find_classes(str(self.train_dir))[0]
        return self._classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes)

    def expected_files(self) -> Sequence[Path]:
        return [self.train_dir, self.test_dir]

    def check_available(self) -> None:
        # An ImageFolder tree cannot be downloaded, so check even with download=true.
        self.refuse_missing([p for p in self.expected_files() if not Path(p).is_dir()],
                            f"Set dataset.root=<dir with {self.train_dir.name}/ and {self.test_dir.name}/ class "
                            "folders>; torchvision cannot fetch an ImageFolder tree, so dataset.download=true does "
                            "not help here.")

    def train_transform(self) -> Callable:
        if self.augment:
            aug = [transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip()]
        else:
            aug = [transforms.Resize(self.resize_size), transforms.CenterCrop(self.image_size)]
        return transforms.Compose(aug + [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def eval_transform(self) -> Callable:
        return transforms.Compose([
            transforms.Resize(self.resize_size),
            transforms.CenterCrop(self.image_size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def _folder(self, folder: Path, transform: Callable | None, min_classes: int = 2) -> Dataset:
        check_image_tree(folder, min_classes)  # enough class folders, none empty (names the folder)
        data = datasets.ImageFolder(str(folder), transform=transform, loader=checked_loader)
        verify_images(data.samples)  # small trees: every image decoded once, before training
        return data

    def _load_train_base(self) -> Dataset:
        self.check_available()
        base = self._folder(self.train_dir, None)
        self._classes = list(base.classes)
        return base

    def _test_dataset(self) -> Dataset:
        test = self._folder(self.test_dir, self.eval_transform(), min_classes=1)  # must match train's: below
        if test.classes != self.classes:
            extra = sorted(set(test.classes) - set(self.classes))
            lacking = sorted(set(self.classes) - set(test.classes))
            raise ConfigError(
                f"The class folders of {self.test_dir} differ from those of {self.train_dir} "
                f"(only in test: {extra[:5]}, only in train: {lacking[:5]}): labels would not match. "
                f"Give both dirs the same class folders."
            )
        return test
