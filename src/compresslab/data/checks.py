"""Checks of dataset files before any training: each failure names the file or folder and what to do.

* IDX files (MNIST, Fashion-MNIST): magic number, dimensions and the size the header implies
  (torchvision would fail with a bare ``AssertionError`` or a reshape error);
* image folders: a train/test dir with fewer than two class folders, or a class folder without an
  image file (torchvision's message names neither); images that cannot be decoded, checked up front
  for trees of at most :data:`VERIFY_LIMIT` files and, for any tree, when a sample is read
  (:func:`checked_loader`);
* CIFAR without the md5 comparison (opt-in ``verify_integrity=false``).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

from torchvision import datasets

#: Image trees up to this many files are decoded once before training (a truncated JPEG fails then,
#: not in the middle of an epoch); larger ones are checked as their samples are read.
VERIFY_LIMIT = 5000
#: IDX magic numbers of unsigned-byte data: 0x0000080N, N the number of dimensions.
IDX_NDIM = {"labels": 1, "images": 3}


class DataFileError(ValueError):
    """A dataset file or folder is there but cannot be used (its path and the fix in the message)."""


def check_idx(path: Path, kind: str) -> tuple[int, ...]:
    """The dimensions of IDX file ``path`` (``kind``: ``images`` or ``labels``) after checking its magic
    number and that its size is what its header says; :class:`DataFileError` otherwise."""
    path = Path(path)
    ndim = IDX_NDIM[kind]
    fix = f"Replace it with the original {path.name} (uncompressed) or set dataset.root to a folder with intact files."
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 + 4 * ndim)
    if len(head) < 4 + 4 * ndim:
        raise DataFileError(f"{path}: {size} bytes, too short for the header of an IDX {kind} file. {fix}")
    magic = struct.unpack(">I", head[:4])[0]
    if magic != 0x800 + ndim:
        raise DataFileError(f"{path}: wrong magic number 0x{magic:08x} for an IDX {kind} file (expected "
                            f"0x{0x800 + ndim:08x}: unsigned bytes, {ndim} dimension(s)). {fix}")
    dims = struct.unpack(f">{ndim}I", head[4:])
    expected = 4 + 4 * ndim + math.prod(dims)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise DataFileError(f"{path}: {what}: the header promises {' x '.join(map(str, dims))} values "
                            f"({expected} bytes), the file has {size} bytes. {fix}")
    return dims


def check_idx_pair(images: Path, labels: Path, shape: tuple[int, int]) -> None:
    """An IDX image file and its label file: each intact, ``shape`` images, as many labels as images."""
    dims, (n_labels,) = check_idx(images, "images"), check_idx(labels, "labels")
    if tuple(dims[1:]) != tuple(shape):
        raise DataFileError(f"{images}: images of {dims[1]}x{dims[2]} pixels, this dataset has "
                            f"{shape[0]}x{shape[1]}. Point dataset.root at the right dataset's files.")
    if dims[0] != n_labels:
        raise DataFileError(f"{images} holds {dims[0]} images but {labels} {n_labels} labels: the two files "
                            "do not belong together. Replace them with a matching pair.")


def check_image_tree(folder: Path, min_classes: int = 2) -> int:
    """Class folders of an ImageFolder split: at least ``min_classes``, each with an image file.
    Returns the file count."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if len(classes) < min_classes:
        raise DataFileError(f"{folder}: {len(classes)} class folder(s) ({classes}); a classifier needs at least "
                            f"{'two' if min_classes == 2 else min_classes}: put each class's images in <dir>/<class>/.")
    empty, count = [], 0
    for name in classes:
        n = sum(1 for _, _, files in os.walk(folder / name) for f in files
                if f.lower().endswith(datasets.folder.IMG_EXTENSIONS))
        count += n
        if n == 0:
            empty.append(str(folder / name))
    if empty:
        raise DataFileError(f"class folder(s) without any image file ({', '.join(datasets.folder.IMG_EXTENSIONS)}): "
                            f"{', '.join(empty[:5])}. Add images or remove the folder(s).")
    return count


def checked_loader(path: str):
    """torchvision's image loader, with a failure that names the file."""
    try:
        return datasets.folder.default_loader(path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataFileError(f"{path}: cannot be decoded as an image ({type(exc).__name__}: {exc}). "
                            "Delete or replace the file.") from exc


def verify_images(samples: list[tuple[str, int]]) -> None:
    """Decode every image of a small tree (at most :data:`VERIFY_LIMIT`) once, before training."""
    if len(samples) > VERIFY_LIMIT:
        return
    for path, _ in samples:
        checked_loader(path)


# ---- CIFAR without the md5 check (opt-in: verify_integrity=false) -----------
# torchvision's CIFAR classes compare every batch file with the md5 of the
# official release. These subclasses change only the expected checksums (None:
# check_integrity then tests that the file exists); the reading code is the
# stock one. A download still fetches the official archive and checks its md5.
class CIFAR10Unverified(datasets.CIFAR10):
    """torchvision's CIFAR10 with the per-file md5 comparison turned off."""

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class CIFAR100Unverified(datasets.CIFAR100):
    """torchvision's CIFAR100 with the per-file md5 comparison turned off."""

    train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}
