"""LightningDataModules: embedded (digits, mnist1d) and torchvision-backed datasets."""

from compresslab.data.base import ClassificationDataModule
from compresslab.data.embedded import DigitsDataModule, MNIST1DDataModule
from compresslab.data.folder import ImageFolderDataModule
from compresslab.data.text import ShakespeareDataModule, TextDataModule, TextFileDataModule
from compresslab.data.wikitext import WikiText2DataModule
from compresslab.data.vision import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "ClassificationDataModule",
    "DigitsDataModule",
    "MNIST1DDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageFolderDataModule",
    "TextDataModule",
    "TextFileDataModule",
    "ShakespeareDataModule",
    "WikiText2DataModule",
]
