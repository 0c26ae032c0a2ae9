"""LightningDataModules: embedded (digits, mnist1d) and torchvision-backed datasets."""

from compresslab.data.base import ClassificationDataModule
from compresslab.data.embedded import DigitsDataModule, MNIST1DDataModule

__all__ = ["ClassificationDataModule", "DigitsDataModule", "MNIST1DDataModule"]
