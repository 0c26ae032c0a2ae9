"""The teacher-output cache: the teacher's logits and tapped features per training sample, computed once.

``distill.cache_teacher_outputs=true`` turns it on. It is valid only when a sample's input is the
same every epoch, so it is refused for augmented training data (:func:`check_cache_allowed`), and
when it would need more memory than ``cache_max_mb`` (:func:`open_cache`).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from compresslab.errors import ConfigError

__all__ = ["TeacherOutputCache", "check_cache_allowed", "open_cache"]


class TeacherOutputCache:
    """Teacher logits and tapped features per training sample, filled on first sight.

    Valid only when a sample's input is the same every epoch (no random augmentation)
    and the teacher is deterministic (eval mode). Stored on the CPU; rows are looked
    up by the sample's training-set index.
    """

    def __init__(self, num_samples: int, num_classes: int, feature_shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.num_samples = int(num_samples)
        self.filled = torch.zeros(self.num_samples, dtype=torch.bool)
        self.logits = torch.zeros(self.num_samples, num_classes)
        self.feats = {tap: torch.zeros(self.num_samples, *shape) for tap, shape in feature_shapes.items()}
        self.hits = 0
        self.misses = 0
        self.complete = self.num_samples == 0  # every sample's outputs stored

    @staticmethod
    def nbytes(num_samples: int, num_classes: int, feature_shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Bytes the cache needs (float32)."""
        per_sample = num_classes + sum(math.prod(s) for s in feature_shapes.values())
        return 4 * int(num_samples) * int(per_sample)

    def get(self, index: torch.Tensor, x: torch.Tensor,
            compute: Callable[[torch.Tensor], tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict]:
        """Cached outputs for the samples ``index`` (computing and storing the missing ones)."""
        idx = index.detach().cpu().long()
        if self.complete:  # every sample is in: no lookup of which are missing (the epochs after the first)
            self.hits += len(idx)
            return self._rows(idx, x.device)
        missing = ~self.filled[idx]
        n_missing = int(missing.sum())
        if n_missing:
            mask = missing.to(x.device)
            logits, feats = compute(x[mask])
            rows = idx[missing]
            self.logits[rows] = logits.detach().float().cpu()
            for tap, store in self.feats.items():
                store[rows] = feats[tap].detach().float().cpu()
            self.filled[rows] = True
            self.complete = bool(self.filled.all())
        self.misses += n_missing
        self.hits += len(idx) - n_missing
        return self._rows(idx, x.device)

    def _rows(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict]:
        logits = self.logits.index_select(0, idx).to(device, non_blocking=True)
        feats = {tap: store.index_select(0, idx).to(device, non_blocking=True) for tap, store in self.feats.items()}
        return logits, feats


def check_cache_allowed(datamodule) -> None:
    """Refuse the teacher-output cache for a dataset whose training samples are augmented (the
    teacher's output for a sample would change between epochs, so a cache would be wrong)."""
    if getattr(datamodule, "is_language_model", False):
        raise ConfigError("cache_teacher_outputs=true is not supported for language models: a sample's teacher "
                          "output is a (block_size x vocab) matrix, not one row of logits. Set "
                          "distill.cache_teacher_outputs=false (the teacher then runs on every batch).")
    augmented = getattr(datamodule, "has_augmentation", None)
    if augmented is not False:
        why = ("its training data is randomly augmented" if augmented else
               "it does not declare `has_augmentation = False`")
        raise ConfigError(
            f"cache_teacher_outputs=true is refused for dataset {getattr(datamodule, 'name', datamodule)!r}: "
            f"{why}, so the teacher's output for a sample changes between epochs and a cache would be wrong. "
            "Set distill.cache_teacher_outputs=false, or turn augmentation off (dataset.augment=false).")


def open_cache(datamodule, num_samples: int | None, num_classes: int, feature_shapes: Mapping[str, tuple[int, ...]],
               max_mb: float) -> TeacherOutputCache:
    """An empty cache for ``datamodule``'s training samples, after the augmentation and memory checks."""
    check_cache_allowed(datamodule)
    need = TeacherOutputCache.nbytes(num_samples or 0, num_classes, feature_shapes)
    if need > max_mb * 2 ** 20:
        raise ConfigError(f"the teacher-output cache would need {need / 2 ** 20:.0f} MiB "
                          f"(> cache_max_mb={max_mb:g}); tap fewer/smaller layers or raise it")
    return TeacherOutputCache(num_samples, num_classes, feature_shapes)
