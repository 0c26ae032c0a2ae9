"""The options of every ``conf/prune/*.yaml`` method: types, enums and ranges, declared once
(:mod:`compresslab.config_schema`); each method class points at its schema with ``options = ...``.
Rules between options (a schedule that must fit ``student.epochs``, ``lamp`` needing
``scope=global``) stay in the methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from compresslab.compress.codecs.sparse import COMPRESSIONS, ENCODINGS
from compresslab.compress.prune.channels import IMPORTANCES
from compresslab.config_schema import option

Unit = Literal["epoch", "step"]
Scope = Literal["layer", "global"]
EPOCHS_HINT = "the student's epochs: keep ${student.epochs}"


@dataclass
class UnstructuredOptions:
    """What every unstructured method (magnitude, agp, l1_threshold, lottery) takes."""

    final_sparsity: float = option(ge=0, lt=1, hint="fraction of the prunable weights set to zero")
    scope: Scope = option()
    include_classifier: bool = option()
    exclude: list[str] = option(hint="module-name patterns never pruned")
    unit: Unit = option()
    select_after_pruning: bool = option()
    encoding: Literal[ENCODINGS] = option()
    compression: Literal[COMPRESSIONS] = option()
    epochs: Optional[int] = option(ge=1, hint=EPOCHS_HINT)


@dataclass
class AGPOptions(UnstructuredOptions):
    """``prune=agp``."""

    initial_sparsity: float = option(ge=0, lt=1)
    start: int = option(ge=0)
    end: int = option(ge=0)
    frequency: int = option(ge=1)


@dataclass
class L1ThresholdOptions(UnstructuredOptions):
    """``prune=l1_threshold``."""

    penalty: Literal["l1", "l2"] = option()
    strength: float = option(ge=0)
    cut: int = option(ge=0)
    threshold: Optional[float] = option(ge=0, hint="null: cut to final_sparsity")
    regularize_after_cut: bool = option()


@dataclass
class LotteryOptions:
    """``prune.lottery`` of ``prune=magnitude`` / ``prune=lottery``."""

    enabled: bool = option()
    rounds: int = option(ge=1)
    rewind_to: int = option(ge=0)
    reinit: Literal["rewind", "random"] = option()
    reinit_seed: int = option(ge=0)


@dataclass
class MagnitudeOptions(UnstructuredOptions):
    """``prune=magnitude`` and ``prune=lottery``."""

    at: int = option(ge=0)
    rounds: int = option(ge=1)
    lottery: Optional[LotteryOptions] = option()


@dataclass
class ChannelOptions:
    """What both channel-removing methods (structured, slimming) take."""

    ratio: float = option(ge=0, lt=1, hint="fraction of the prunable channels removed")
    steps: int = option(ge=1)
    start: int = option(ge=0)
    end: Optional[int] = option(ge=0, hint="null: start + steps - 1")
    unit: Unit = option()
    exclude: list[str] = option(hint="module-name patterns never pruned")
    max_layer_ratio: float = option(ge=0, le=1)
    select_after_pruning: bool = option()
    epochs: Optional[int] = option(ge=1, hint=EPOCHS_HINT)


@dataclass
class GroupNormOptions:
    """``prune.group_norm`` (``importance=group_norm``)."""

    reg: float = option(ge=0)
    alpha: float = option(ge=0)


@dataclass
class StructuredOptions(ChannelOptions):
    """``prune=structured``."""

    importance: Literal[IMPORTANCES] = option()
    scope: Scope = option()
    round_to: Optional[int] = option(ge=1)
    taylor_batches: int = option(ge=1)
    group_norm: Optional[GroupNormOptions] = option()


@dataclass
class SlimmingOptions(ChannelOptions):
    """``prune=slimming``."""

    strength: float = option(ge=0, hint="lambda of the L1 penalty on the BN scales")
    regularize_after_pruning: bool = option()


@dataclass
class SensitivityOptions:
    """``prune=sensitivity``."""

    sparsities: list[float] = option(ge=0, le=1)
    split: Literal["val", "test"] = option()
    max_batches: Optional[int] = option(ge=1, hint="null: the whole split")
    include_classifier: bool = option()
    tolerance: float = option(ge=0)
