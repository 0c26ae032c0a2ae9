"""The student's data regime: which training samples it sees, and which of them carry a label.

Distillation papers make their claims on transfer sets that differ from the teacher's data:
a small fraction of the training set (Hinton et al. 2015, §4.2), a set with whole classes
left out (§3, the omitted 3), or a set that is only partly labelled, where the student gets
soft targets for every sample and hard labels for some. Three dataset options express them,
for every datamodule:

* ``train_fraction`` (0 < f ≤ 1): a class-stratified, seeded (``subset_seed``) subset of the
  training split (after the validation samples were carved out of it);
* ``exclude_classes``: labels removed from the student's training split;
* ``unlabeled_fraction`` (0 ≤ u ≤ 1): a stratified, seeded share of the student's training
  samples whose label is hidden: they come with the label :data:`UNLABELED` (−1), and the
  hard-label loss skips them (:func:`labelled_cross_entropy`).

The validation and test splits keep every class and every label, and the teacher always trains
on the full training split (:meth:`ClassificationDataModule.full_split_view`); the regime keys
are not part of the teacher's cache key (:data:`STUDENT_REGIME_KEYS`), so a sweep over student
regimes trains one teacher.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from compresslab.errors import ConfigError

#: The label of a training sample whose label the student does not see.
UNLABELED = -1
#: Dataset keys that only change the student's training split (never the teacher's).
STUDENT_REGIME_KEYS = ("train_fraction", "subset_seed", "exclude_classes", "unlabeled_fraction")


def regime_values(train_fraction, exclude_classes, unlabeled_fraction, subset_seed) -> tuple:
    """The regime options normalised (their types and ranges are :class:`~compresslab.data.options.DatasetOptions`):
    ``(train_fraction, sorted labels, unlabeled_fraction, subset_seed)``."""
    if isinstance(exclude_classes, int):
        exclude_classes = [exclude_classes]
    return float(train_fraction), sorted({int(c) for c in exclude_classes or []}), float(unlabeled_fraction), int(subset_seed)


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """The labels of every sample of ``dataset`` as a long tensor, without loading the inputs
    where the dataset keeps them apart (``targets`` of torchvision datasets, TensorDatasets)."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def stratified_pick(indices: Sequence[int], labels: torch.Tensor, fraction: float, seed: int) -> list[int]:
    """``round(fraction · len(indices))`` of ``indices``, spread over classes in proportion to their
    counts (largest remainder), drawn with a generator seeded by ``seed``. Sorted."""
    indices = list(indices)
    n_pick = int(round(fraction * len(indices)))
    if n_pick >= len(indices):
        return sorted(indices)
    g = torch.Generator().manual_seed(int(seed))
    by_class: dict[int, list[int]] = {}
    for i, y in zip(indices, labels.tolist()):
        by_class.setdefault(int(y), []).append(i)
    classes = sorted(by_class)
    exact = {c: fraction * len(by_class[c]) for c in classes}
    take = {c: int(math.floor(exact[c])) for c in classes}
    left = n_pick - sum(take.values())
    # largest remainder first; ties broken by a seeded random order of the classes
    order = torch.randperm(len(classes), generator=g).tolist()
    ranked = sorted(range(len(classes)), key=lambda k: (-(exact[classes[k]] - take[classes[k]]), order[k]))
    for k in ranked[:max(0, left)]:
        take[classes[k]] += 1
    picked: list[int] = []
    for c in classes:
        members = by_class[c]
        perm = torch.randperm(len(members), generator=g).tolist()
        picked += [members[j] for j in perm[:take[c]]]
    return sorted(picked)


class RegimeSubset(Subset):
    """A ``Subset`` whose samples at the positions in ``hidden`` come with the label :data:`UNLABELED`."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], hidden: Iterable[int] = ()) -> None:
        super().__init__(dataset, list(indices))
        self.hidden = frozenset(int(i) for i in hidden)

    def __getitem__(self, idx):
        base_index = self.indices[idx]
        x, y = self.dataset[base_index][:2]
        if base_index in self.hidden:
            y = torch.full_like(y, UNLABELED) if isinstance(y, torch.Tensor) else UNLABELED
        return x, y

    def __getitems__(self, indices):  # DataLoader's batched fetch: keep the label masking
        return [self[i] for i in indices]


def student_split(pool: Sequence[int], labels: torch.Tensor, num_classes: int, train_fraction: float,
                  exclude_classes: Sequence[int], unlabeled_fraction: float, subset_seed: int,
                  dataset_name: str = "dataset") -> tuple[list[int], list[int]]:
    """The student's training indices and the subset of them whose labels are hidden.

    ``pool``: the full training split's indices into the training files; ``labels``: their labels
    (same order). Raises ConfigError for unknown labels, excluding every class, or an empty subset.
    """
    unknown = [c for c in exclude_classes if not 0 <= c < num_classes]
    if unknown:
        raise ConfigError(f"dataset.exclude_classes={list(exclude_classes)}: {unknown} are not class labels of "
                          f"'{dataset_name}' (labels 0..{num_classes - 1})")
    present = sorted(set(int(v) for v in labels.tolist()))
    remaining = [c for c in present if c not in set(exclude_classes)]
    if not remaining:
        raise ConfigError(f"dataset.exclude_classes={list(exclude_classes)} removes every class of '{dataset_name}' "
                          "from the student's training split; keep at least one")
    keep = [k for k, y in enumerate(labels.tolist()) if int(y) not in set(exclude_classes)]
    pool_kept = [pool[k] for k in keep]
    labels_kept = labels[torch.as_tensor(keep, dtype=torch.long)] if keep else labels[:0]
    picked = stratified_pick(pool_kept, labels_kept, train_fraction, subset_seed)
    if not picked:
        raise ConfigError(
            f"dataset.train_fraction={train_fraction:g} of the {len(pool_kept)} training samples of '{dataset_name}'"
            f"{' left after exclude_classes' if exclude_classes else ''} is an empty subset; raise it to at least "
            f"{1.0 / max(1, len(pool_kept)) * 0.5:.2g}")
    hidden: list[int] = []
    if unlabeled_fraction > 0:
        label_of = dict(zip(pool_kept, labels_kept.tolist()))
        picked_labels = torch.as_tensor([label_of[i] for i in picked], dtype=torch.long)
        hidden = stratified_pick(picked, picked_labels, unlabeled_fraction, subset_seed + 7919)
    return picked, hidden


def token_rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence outputs as rows of a classification: logits ``(B, T, C)`` and targets ``(B, T)`` (a
    causal LM's next-token predictions) become ``(B·T, C)`` and ``(B·T,)``; ``(B, C)`` / ``(B,)`` pass as
    they are. Every loss and accuracy then counts each position (token-weighted)."""
    if logits.dim() > 2:
        logits = logits.reshape(-1, logits.shape[-1])
    if target.dim() > 1:
        target = target.reshape(-1)
    return logits, target


def labelled_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the samples that carry a label (``target != UNLABELED``);
    0 (with a gradient path) for a batch without any label."""
    labelled = target != UNLABELED
    if bool(labelled.all()):
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled], target[labelled], label_smoothing=label_smoothing)


def check_student_regime(datamodule, distill_name: str) -> None:
    """Refuse a student regime that leaves the student nothing to learn from: no labels at all
    with ``distill=none`` (plain supervised training)."""
    n_train = len(getattr(datamodule, "train_indices", ()) or ())
    n_hidden = len(getattr(datamodule, "unlabeled_indices", ()) or ())
    if n_train and n_hidden >= n_train and distill_name == "none":
        raise ConfigError(
            f"dataset.unlabeled_fraction={getattr(datamodule, 'unlabeled_fraction', 1.0):g} hides the label of every "
            f"one of the student's {n_train} training samples, and distill=none trains on labels only: there is "
            "nothing to learn from. Use a distillation method (soft targets), or lower dataset.unlabeled_fraction.")
