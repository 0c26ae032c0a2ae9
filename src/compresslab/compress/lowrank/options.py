"""The options of every ``conf/lowrank/*.yaml`` method: types, enums and ranges, declared once
(:mod:`compresslab.config_schema`); each method class points at its schema with ``options = ...``.
Rules between options (which rank option goes with which ``rank_mode``) stay in the methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from compresslab.config_schema import option

FROM_END = "negative counts from the end of the student fit"


@dataclass
class SVDOptions:
    """``lowrank=svd``."""

    rank_ratio: Optional[float] = option(gt=0, le=1, hint="rank = ratio x full rank")
    energy: Optional[float] = option(gt=0, le=1, hint="share of sum(S^2) kept")
    conv_mode: Literal["channel", "spatial"] = option()
    when: Literal["before", "after"] = option()
    start_epoch: int = option(hint=FROM_END)
    min_rank: int = option(ge=1)
    exclude: list[str] = option(hint="module-name patterns kept dense")
    keep_first_last: bool = option()
    only_if_smaller: bool = option()


@dataclass
class TensorOptions:
    """``lowrank=tucker`` and ``lowrank=cp``."""

    decomposition: Literal["tucker2", "cp"] = option()
    rank_mode: Literal["vbmf", "energy", "ratio", "params"] = option(hint="tucker2: vbmf | energy | ratio; "
                                                                          "cp: vbmf | params")
    rank_ratio: Optional[float] = option(gt=0, le=1)
    energy: Optional[float] = option(gt=0, le=1)
    param_ratio: Optional[float] = option(gt=0, le=1)
    ranks: Optional[dict[str, Union[int, list[int]]]] = option(ge=1, hint="tucker2: {layer: [rank_out, rank_in]}; "
                                                                          "cp: {layer: rank}")
    start_epoch: int = option(hint=FROM_END)
    min_rank: int = option(ge=1)
    exclude: list[str] = option(hint="module-name patterns kept dense")
    only_if_smaller: bool = option()
    n_iter_max: int = option(ge=1)
