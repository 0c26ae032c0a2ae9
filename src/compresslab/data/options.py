"""The types and ranges of the ``dataset.*`` options every datamodule takes, declared once
(:mod:`compresslab.config_schema`): checked by the datamodules' constructors and, before the
datamodule is built, by :func:`compresslab.run_options.check_run_options`. Rules that need the
data (labels that exist, a subset that is not empty) stay in :mod:`compresslab.data.regime`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

from compresslab.config_schema import check_options, option

#: the largest seed numpy (and so Lightning's seed_everything) accepts
MAX_SEED = 2**32 - 1


@dataclass
class DatasetOptions:
    """``dataset.*`` of every datamodule (keys a datamodule does not have are simply absent)."""

    partial: ClassVar[bool] = True
    batch_size: int = option(ge=1, hint="per device")
    eval_batch_size: Optional[int] = option(ge=1, hint="null: batch_size")
    num_workers: int = option(ge=0)
    val_fraction: float = option(gt=0, lt=1, hint="share of the training split held out for validation")
    test_fraction: float = option(gt=0, lt=1, hint="share of the samples held out for testing")
    split_seed: int = option(ge=0, le=MAX_SEED)
    num_samples: int = option(ge=1)
    train_fraction: float = option(gt=0, le=1, hint="class-stratified share of the training split")
    unlabeled_fraction: float = option(ge=0, le=1)
    subset_seed: int = option(ge=0, le=MAX_SEED)
    exclude_classes: Union[None, int, list[int]] = option(ge=0, hint="class labels")
    block_size: int = option(ge=2, hint="tokens per training sequence (text datasets)")
    vocab_size: int = option(ge=2, hint="BPE vocabulary size (dataset.tokenizer=bpe)")
    tokenizer: Literal["char", "bpe"] = option()


def check_dataset_options(**values: Any) -> None:
    """Check datamodule constructor arguments against :class:`DatasetOptions` (keys ``dataset.<name>``)."""
    check_options(DatasetOptions, values, "dataset")
