"""Dataset files: array datasets decoded once into resident tensors (``on_device=auto``), and broken
files refused before training with the file or folder named (issue #24, class 4). Tiny files in the
real formats; nothing from ../shared."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from PIL import Image
from test_vision_data import write_mnist

from compresslab.data import DigitsDataModule, ImageFolderDataModule, MNISTDataModule
from compresslab.data.checks import DataFileError
from compresslab.data.on_device import TensorBatches, stack_dataset
from compresslab.data.vision import MNIST_MEAN, MNIST_STD


def _raw(root):
    return root / "MNIST" / "raw"


# ---- decoded once, batched as tensors ------------------------------------------
def test_mnist_is_decoded_from_the_idx_arrays_and_auto_batches_resident_tensors(tmp_path):
    data = write_mnist(tmp_path, n_train=40, n_test=10)
    dm = MNISTDataModule(root=tmp_path, batch_size=8)
    assert dm.on_device == "auto" and dm.array_backed
    dm.setup()
    assert dm.resident()
    # the test split, decoded at once, equals ToTensor + Normalize of each image
    expected = (torch.as_tensor(data["t10k"][0], dtype=torch.float32) / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    torch.testing.assert_close(dm.test_set.tensors[0][:, 0], expected)
    assert dm.test_set.targets.tolist() == data["t10k"][1].tolist()
    loader = dm.train_dataloader()
    assert isinstance(loader, TensorBatches)
    seen = torch.cat([y for _, y in loader])
    assert sorted(seen.tolist()) == sorted(data["train"][1][dm.train_indices].tolist())
    # with_index (the teacher cache, CRD): the index is the sample's row of train_set
    dm.with_index = True
    x, y, index = next(iter(dm.train_dataloader()))
    for k in range(len(index)):
        xs, ys = dm.train_set[int(index[k])]
        assert torch.equal(x[k], xs) and int(y[k]) == int(ys)


def test_on_device_false_keeps_the_dataloader_and_bad_values_are_refused(tmp_path):
    write_mnist(tmp_path)
    dm = MNISTDataModule(root=tmp_path, on_device="false")
    dm.setup()
    assert not dm.resident() and isinstance(dm.train_dataloader(), torch.utils.data.DataLoader)
    with pytest.raises(ValueError, match="dataset.on_device must be true, false or auto, got 'sometimes'"):
        MNISTDataModule(root=tmp_path, on_device="sometimes")


def test_stack_dataset_indexes_the_tensors_of_array_datasets():
    dm = DigitsDataModule()
    dm.setup()
    x, y = stack_dataset(dm.val_set)
    slow = [dm.val_set[i] for i in range(len(dm.val_set))]
    assert torch.equal(x, torch.stack([s[0] for s in slow])) and y.tolist() == [int(s[1]) for s in slow]


def test_mnist_tensors_are_built_without_decoding_a_sample(tmp_path, monkeypatch):
    """No per-sample decode (PIL + transform, 6 s for MNIST's 60,000 images): the splits come from
    torchvision's ``.data`` arrays at once (0.3 s for MNIST, measured in the report)."""
    from torchvision import datasets

    write_mnist(tmp_path, n_train=200, n_test=50)

    def per_sample(self, i):
        raise AssertionError("a sample was decoded one by one")

    monkeypatch.setattr(datasets.MNIST, "__getitem__", per_sample)
    dm = MNISTDataModule(root=tmp_path, batch_size=16)
    dm.setup()
    for split in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        next(iter(split))
    assert dm._resident["train"][0].shape == (180, 1, 28, 28)
    assert dm.example_batch(4).shape == (4, 1, 28, 28)


# ---- broken files: refused before training, naming the file ----------------------
def test_idx_with_a_wrong_magic_number_names_the_file(tmp_path):
    write_mnist(tmp_path)
    path = _raw(tmp_path) / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[:4] = struct.pack(">I", 2049)  # a labels magic on an images file
    path.write_bytes(bytes(raw))
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte: wrong magic number 0x00000801.*0x00000803"):
        MNISTDataModule(root=tmp_path).setup()


def test_truncated_idx_names_the_file_and_the_sizes(tmp_path):
    write_mnist(tmp_path, n_train=20)
    path = _raw(tmp_path) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte: truncated: .*20 x 28 x 28.*15696 bytes\), "
                                             r"the file has 15596"):
        MNISTDataModule(root=tmp_path).setup()


def test_idx_images_and_labels_that_do_not_match(tmp_path):
    write_mnist(tmp_path, n_train=20)
    labels = _raw(tmp_path) / "train-labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">II", 2049, 19) + bytes(19))
    with pytest.raises(DataFileError, match="holds 20 images but .*train-labels-idx1-ubyte 19 labels"):
        MNISTDataModule(root=tmp_path).setup()


def _tree(root, classes=("a", "b"), n=2):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(root / split / c / f"{i}.jpg")


def test_a_corrupt_jpeg_is_named_before_training(tmp_path):
    _tree(tmp_path)
    bad = tmp_path / "train" / "b" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    dm = ImageFolderDataModule(root=tmp_path, image_size=8, val_fraction=0.5)
    with pytest.raises(DataFileError, match=r"train/b/1.jpg: cannot be decoded as an image .*Delete or replace"):
        dm.setup()


def test_an_empty_class_folder_is_named(tmp_path):
    _tree(tmp_path)
    (tmp_path / "train" / "c").mkdir()
    with pytest.raises(DataFileError, match=r"without any image file .*train/c"):
        ImageFolderDataModule(root=tmp_path, image_size=8).setup()


def test_a_one_class_tree_is_refused_naming_the_folder(tmp_path):
    _tree(tmp_path, classes=("only",))
    dm = ImageFolderDataModule(root=tmp_path, image_size=8)
    with pytest.raises(DataFileError, match=r"train: 1 class folder\(s\) \(\['only'\]\); a classifier needs at least two"):
        dm.num_classes
    assert not dm.array_backed  # image folders keep the DataLoader path
