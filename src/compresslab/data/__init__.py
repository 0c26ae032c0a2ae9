"""LightningDataModules: embedded (digits, mnist1d) and torchvision-backed datasets."""

from compresslab.data.base import ClassificationDataModule
from compresslab.data.embedded import DigitsDataModule, MNIST1DDataModule
from compresslab.data.vision import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)

__all__ = [
    "ClassificationDataModule",
    "DigitsDataModule",
    "MNIST1DDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageFolderDataModule",
]
