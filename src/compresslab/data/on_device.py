"""Keep a small dataset as tensors on the training device and augment there.

For digits, mnist1d, MNIST and CIFAR the whole training set fits in (GPU) memory;
iterating over index batches of resident tensors removes the DataLoader (workers,
collation, host-to-device copies) from the hot path. Augmentation (random crop with
padding, horizontal flip) runs batched on the device.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from compresslab.data.regime import UNLABELED


def tensor_view(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x, y)`` of a TensorDataset, or of (nested) Subsets of one, by indexing its tensors: no
    per-sample call. Hidden labels of a :class:`~compresslab.data.regime.RegimeSubset` become
    ``UNLABELED``. None for any other dataset."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1].long()
    if not isinstance(dataset, Subset):
        return None
    inner = tensor_view(dataset.dataset)
    if inner is None:
        return None
    idx = torch.as_tensor(list(dataset.indices), dtype=torch.long)
    x, y = inner[0][idx], inner[1][idx]
    hidden = getattr(dataset, "hidden", None)
    if hidden:
        y = torch.where(torch.as_tensor([int(i) in hidden for i in dataset.indices]), UNLABELED, y)
    return x, y


def stack_dataset(dataset: Dataset, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) samples of ``dataset`` as two tensors on ``device`` (array-backed datasets by
    indexing their tensors, others sample by sample)."""
    view = tensor_view(dataset)
    if view is None:
        xs, ys = zip(*(dataset[i][:2] for i in range(len(dataset))))
        view = torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)
    return view[0].to(device), view[1].to(device)


def random_crop_flip(x: torch.Tensor, padding: int, pad_value: torch.Tensor | None = None,
                     flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched RandomCrop(size, padding) + RandomHorizontalFlip on an (N, C, H, W) tensor.

    ``pad_value`` (per channel) is what a zero pixel becomes after normalization, so
    the padding matches torchvision's pad-then-normalize order.
    """
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    if pad_value is not None:
        border = torch.ones(1, 1, h + 2 * padding, w + 2 * padding, device=x.device, dtype=torch.bool)
        border[..., padding:padding + h, padding:padding + w] = False
        padded = torch.where(border, pad_value.view(1, c, 1, 1).to(x), padded)
    oy = torch.randint(0, 2 * padding + 1, (n,), device="cpu", generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), device="cpu", generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    return out


class TensorBatches:
    """An iterable of (x, y) mini-batches drawn from tensors that already live on the device.

    Shuffles each epoch (seeded by ``seed`` + epoch), shards indices across DDP ranks
    (``rank``/``world``), and applies ``augment`` to each training batch. ``with_index``: batches
    are ``(x, y, index)``, ``index`` the samples' rows of ``x`` (the teacher-output cache and CRD
    look samples up by it).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 rank: int = 0, world: int = 1, with_index: bool = False) -> None:
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self.with_index = bool(with_index)
        self.epoch = 0

    def _indices(self) -> torch.Tensor:
        n = self.x.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        return idx[self.rank::self.world].to(self.x.device)

    def __len__(self) -> int:
        return math.ceil(len(range(self.rank, self.x.shape[0], self.world)) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        idx = self._indices()
        self.epoch += 1
        if not self.shuffle and self.world == 1 and self.augment is None and not self.with_index:
            # in order: contiguous slices, no gather
            for start in range(0, idx.numel(), self.batch_size):
                yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
            return
        for b in idx.split(self.batch_size):
            xb = self.x.index_select(0, b)
            if self.augment is not None:
                xb = self.augment(xb)
            yield (xb, self.y.index_select(0, b), b) if self.with_index else (xb, self.y.index_select(0, b))
