"""torchvision-backed datamodules on tiny files written in the real on-disk formats (no download)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compresslab.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)
from compresslab.data.vision import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, MNIST_MEAN, MNIST_STD
from compresslab.errors import ConfigError, DatasetNotFoundError


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt by torchvision to fetch a file fails the test."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist
    import torchvision.datasets.utils as tv_utils

    def forbidden(*args, **kwargs):
        raise AssertionError(f"download attempted: {args}")

    for mod in (tv_cifar, tv_mnist, tv_utils):
        monkeypatch.setattr(mod, "download_and_extract_archive", forbidden)
    monkeypatch.setattr(tv_utils, "download_url", forbidden)


# ---- writers for the real formats ---------------------------------------------
def _write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    data = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train)),
        "t10k": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test)),
    }
    for split, (x, y) in data.items():
        _write_idx_images(raw / f"{split}-images-idx3-ubyte", x)
        _write_idx_labels(raw / f"{split}-labels-idx1-ubyte", y)
    return data


def _pickle(path: Path, obj) -> None:
    # The official batches were pickled by Python 2; torchvision unpickles them with
    # encoding="latin1", which turns their str keys into Python 3 str ("data", "labels").
    # Python 3 str keys unpickle to the same thing (bytes keys would not: KeyError 'data').
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 10, seed: int = 0) -> dict:
    """cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} as in the official python release."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        _pickle(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5".encode(), "labels": y,
                                              "data": x, "filenames": [b"x.png"] * per_batch})
        xs.append(x)
        ys.extend(y)
    x_te = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    y_te = rng.integers(0, 10, n_test).tolist()
    _pickle(folder / "test_batch", {"batch_label": b"testing batch 1 of 1", "labels": y_te, "data": x_te,
                                    "filenames": [b"x.png"] * n_test})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch,
                                      "num_vis": 3072})
    return {"x_train": np.vstack(xs), "y_train": ys, "x_test": x_te, "y_test": y_te}


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict:
    """cifar-100-python/{train,test,meta} as in the official python release."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        _pickle(folder / split, {"filenames": [b"x.png"] * n, "batch_label": split.encode(),
                                 "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": x})
        out[f"x_{split}"], out[f"y_{split}"] = x, fine
    _pickle(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)],
                              "coarse_label_names": [f"super{i}" for i in range(20)]})
    return out


def write_imagefolder(root: Path, classes=("cat", "dog", "fox"), n_train: int = 4, n_test: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_test)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{c}_{i}.png")


def _chw(row: np.ndarray) -> torch.Tensor:
    """One CIFAR data row (3072 uint8, channel-major) as a float CHW tensor in [0, 1]."""
    return torch.as_tensor(row.reshape(3, 32, 32), dtype=torch.float32) / 255.0


def _normalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


# ---- MNIST / Fashion-MNIST -----------------------------------------------------
@pytest.mark.parametrize("cls,folder", [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")])
def test_mnist_family_loads_idx_files(tmp_path, cls, folder):
    data = write_mnist(tmp_path, folder)
    dm = cls(root=tmp_path, batch_size=8, val_fraction=0.25)
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10 and not dm.has_augmentation
    assert [p.name for p in dm.expected_files()] == [
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    assert all(p.parent == tmp_path / folder / "raw" for p in dm.expected_files())
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 10)

    x_tr, y_tr = data["train"]
    x_te, y_te = data["t10k"]
    x, y = dm.test_set[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y == int(y_te[3])
    expected = _normalized(torch.as_tensor(x_te[3], dtype=torch.float32).unsqueeze(0) / 255.0, dm.mean, dm.std)
    torch.testing.assert_close(x, expected)
    # train and val are disjoint subsets of the train file, labels preserved
    assert sorted(dm.train_indices + dm.val_indices) == list(range(20))
    i = dm.val_indices[0]
    xv, yv = dm.val_set[0]
    assert yv == int(y_tr[i])
    torch.testing.assert_close(xv, _normalized(torch.as_tensor(x_tr[i], dtype=torch.float32)[None] / 255.0,
                                               dm.mean, dm.std))
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 1, 28, 28) and yb.dtype == torch.long
    assert dm.example_batch(4).shape == (4, 1, 28, 28)


def test_mnist_normalization_constants():
    assert MNISTDataModule.mean == MNIST_MEAN == (0.1307,) and MNIST_STD == (0.3081,)
    assert FashionMNISTDataModule.mean != MNISTDataModule.mean


def test_mnist_missing_raises_before_training(tmp_path):
    dm = MNISTDataModule(root=tmp_path / "nowhere")
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as err:
            step()
        msg = str(err.value)
        assert "dataset.download=true" in msg
        assert str((tmp_path / "nowhere").resolve()) in msg
        assert "train-images-idx3-ubyte" in msg


def test_mnist_download_true_with_files_present_does_not_fetch(tmp_path):
    write_mnist(tmp_path)
    dm = MNISTDataModule(root=tmp_path, download=True)
    dm.prepare_data()  # torchvision's download() sees the files and returns (no_network fixture guards)
    dm.setup()
    assert len(dm.test_set) == 10


def test_download_only_in_prepare_data(tmp_path, monkeypatch):
    """setup never asks torchvision to download, even with download=true."""
    import torchvision.datasets as tvd

    calls = []
    orig = tvd.MNIST.__init__

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("download"))
        orig(self, *args, **kwargs)

    monkeypatch.setattr(tvd.MNIST, "__init__", spy)
    write_mnist(tmp_path)
    dm = MNISTDataModule(root=tmp_path, download=True)
    dm.setup()
    assert calls and not any(calls)
    calls.clear()
    dm.prepare_data()
    assert calls == [True, True]


# ---- CIFAR ---------------------------------------------------------------------
def test_cifar10_official_md5_check_is_kept_by_default(tmp_path):
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=tmp_path)
    assert dm.verify_integrity
    dm.prepare_data()  # files exist: passes the existence check
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup()  # torchvision's md5 check rejects the non-official files
    msg = str(err.value)
    assert "verify_integrity=false" in msg and "dataset.download=true" in msg
    assert "cifar-10-batches-py" in msg


def test_cifar10_loads_pickled_batches(tmp_path):
    data = write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=tmp_path, verify_integrity=False, batch_size=4, val_fraction=0.2)
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == 10 and dm.has_augmentation
    names = [p.name for p in dm.expected_files()]
    assert names == [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 10)
    assert dm.test_set.classes[0] == "airplane"

    x, y = dm.test_set[2]
    assert x.shape == (3, 32, 32) and y == data["y_test"][2]
    torch.testing.assert_close(x, _normalized(_chw(data["x_test"][2]), CIFAR10_MEAN, CIFAR10_STD))
    # val: eval transform on train-file samples
    i = dm.val_indices[1]
    xv, yv = dm.val_set[1]
    assert yv == data["y_train"][i]
    torch.testing.assert_close(xv, _normalized(_chw(data["x_train"][i]), CIFAR10_MEAN, CIFAR10_STD))
    assert [dm.train_set[k][1] for k in range(len(dm.train_set))] == [data["y_train"][j] for j in dm.train_indices]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 32, 32) and yb.shape == (4,)


def test_cifar_train_augmentation(tmp_path):
    data = write_cifar10(tmp_path)
    torch.manual_seed(0)
    aug = CIFAR10DataModule(root=tmp_path, verify_integrity=False)
    aug.setup()
    loads = [aug.train_set[0][0] for _ in range(6)]
    assert any(not torch.equal(loads[0], other) for other in loads[1:])
    # the val split of the same datamodule is not augmented
    assert torch.equal(aug.val_set[0][0], aug.val_set[0][0])

    plain = CIFAR10DataModule(root=tmp_path, verify_integrity=False, augment=False)
    assert not plain.has_augmentation
    plain.setup()
    a, b = plain.train_set[0][0], plain.train_set[0][0]
    assert torch.equal(a, b)
    # without augmentation the train sample is the plain normalized image
    i = plain.train_indices[0]
    torch.testing.assert_close(a, _normalized(_chw(data["x_train"][i]), CIFAR10_MEAN, CIFAR10_STD))


def test_cifar100_loads_fine_labels(tmp_path):
    data = write_cifar100(tmp_path)
    dm = CIFAR100DataModule(root=tmp_path, verify_integrity=False, val_fraction=0.1, augment=False)
    assert dm.num_classes == 100 and dm.input_shape == (3, 32, 32)
    assert [p.name for p in dm.expected_files()] == ["train", "test", "meta"]
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (27, 3, 10)
    assert [dm.test_set[k][1] for k in range(10)] == data["y_test"]
    x, _ = dm.test_set[0]
    torch.testing.assert_close(x, _normalized(_chw(data["x_test"][0]), CIFAR100_MEAN, CIFAR100_STD))
    assert dm.test_set.classes[:2] == ["class0", "class1"]


@pytest.mark.parametrize("cls,folder", [(CIFAR10DataModule, "cifar-10-batches-py"),
                                        (CIFAR100DataModule, "cifar-100-python")])
def test_cifar_missing_raises(tmp_path, cls, folder):
    dm = cls(root=tmp_path / "empty", verify_integrity=False)
    with pytest.raises(DatasetNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "dataset.download=true" in msg and str((tmp_path / "empty").resolve()) in msg and folder in msg
    with pytest.raises(DatasetNotFoundError):
        dm.setup()


# ---- ImageFolder ---------------------------------------------------------------
def test_imagefolder_tree(tmp_path):
    write_imagefolder(tmp_path)
    dm = ImageFolderDataModule(root=tmp_path, image_size=32, val_fraction=0.25, batch_size=3)
    assert dm.num_classes == 3  # read before setup
    assert dm.input_shape == (3, 32, 32) and dm.has_augmentation
    assert dm.describe() == {"name": "imagefolder", "input_shape": [3, 32, 32], "num_classes": 3}
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 6)
    assert [dm.test_set[k][1] for k in range(6)] == [0, 0, 1, 1, 2, 2]
    x, y = dm.test_set[0]
    assert x.shape == (3, 32, 32)
    assert x.min() < -0.5 and x.max() > 0.5  # ImageNet normalization moved values out of [0, 1]
    xt, _ = dm.train_set[0]
    assert xt.shape == (3, 32, 32)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (3, 3, 32, 32)
    # val samples use the deterministic eval transform
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def test_imagefolder_eval_normalization(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):  # a classifier needs two classes (a one-class tree is refused)
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (16, 16), (255, 0, 128)).save(tmp_path / split / c / "x.png")
    dm = ImageFolderDataModule(root=tmp_path, image_size=8, val_fraction=0.5)
    dm.setup()
    x, _ = dm.test_set[0]
    rgb = torch.tensor([1.0, 0.0, 128 / 255])
    expected = ((rgb - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    torch.testing.assert_close(x[:, 4, 4], expected)


def test_imagefolder_missing_and_mismatched(tmp_path):
    dm = ImageFolderDataModule(root=tmp_path / "imnet")
    with pytest.raises(DatasetNotFoundError) as err:
        dm.num_classes
    assert str((tmp_path / "imnet").resolve()) in str(err.value) and "dataset.download=true" in str(err.value)
    with pytest.raises(DatasetNotFoundError):
        ImageFolderDataModule(root=tmp_path / "imnet", download=True).prepare_data()

    write_imagefolder(tmp_path / "t", classes=("a", "b"))
    (tmp_path / "t" / "val" / "b" / "b_0.png").rename(tmp_path / "t" / "val" / "a" / "moved.png")
    for p in (tmp_path / "t" / "val" / "b").iterdir():
        p.unlink()
    (tmp_path / "t" / "val" / "b").rmdir()
    with pytest.raises(ConfigError):
        ImageFolderDataModule(root=tmp_path / "t", image_size=16).setup()


def test_teacher_output_cache_with_augmented_data_is_refused_before_any_training(make_cfg, tmp_path):
    from compresslab.pipeline import run_experiment

    write_cifar10(tmp_path / "data")
    cfg = make_cfg(["dataset=cifar10", "dataset.verify_integrity=false", "dataset.num_workers=0",
                    "teacher=resnet8", "student=resnet8", "distill=kd", "distill.cache_teacher_outputs=true"])
    with pytest.raises(ConfigError, match="augmented.*dataset.augment=false"):
        run_experiment(cfg)
    assert not (tmp_path / "teachers").exists()  # refused before the teacher was trained
    record = run_experiment(make_cfg(["dataset=cifar10", "dataset.verify_integrity=false", "dataset.num_workers=0",
                                      "dataset.augment=false", "teacher=resnet8", "student=resnet8", "distill=kd",
                                      "distill.cache_teacher_outputs=true", "dataset.val_fraction=0.2"]))
    assert record["status"] == "completed"
