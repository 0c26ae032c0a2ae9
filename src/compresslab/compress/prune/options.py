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
    # 0: a trained LM pruned without training (student.epochs=0); a schedule then fails to fit, by name
    epochs: Optional[int] = option(ge=0, hint=EPOCHS_HINT)


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

    at: Optional[int] = option(ge=0, hint="null: one-shot after training, no fine-tuning")
    rounds: int = option(ge=1)
    lottery: Optional[LotteryOptions] = option()
    n: Optional[int] = option(ge=1, hint="with prune.m and prune.at=null: n nonzeros in every m inputs")
    m: Optional[int] = option(ge=2, le=256, hint="null: unstructured")


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


#: head rankings of ``prune=heads``
HEAD_IMPORTANCES = ("gradient", "magnitude", "random")


@dataclass
class HeadOptions:
    """``prune=heads``."""

    ratio: float = option(ge=0, lt=1, hint="share of the attention heads removed")
    importance: Literal[HEAD_IMPORTANCES] = option()
    scope: Scope = option()
    start: Optional[int] = option(ge=0, hint="null: prune after training, no fine-tuning")
    steps: int = option(ge=1)
    end: Optional[int] = option(ge=0, hint="null: start + steps - 1")
    unit: Unit = option()
    seed: int = option(ge=0)
    taylor_batches: int = option(ge=1, hint="training batches scored for importance=gradient")
    exclude: list[str] = option(hint="attention-module name patterns never pruned")
    select_after_pruning: bool = option()
    epochs: Optional[int] = option(ge=1, hint=EPOCHS_HINT)


@dataclass
class NMOptions:
    """``prune=nm`` (the final sparsity is 1 - n/m, not an option)."""

    n: int = option(ge=1, hint="nonzeros kept in every group of m")
    m: int = option(ge=2, le=256)
    start: int = option(ge=0)
    steps: int = option(ge=1)
    every: int = option(ge=1)
    unit: Unit = option()
    include_classifier: bool = option()
    exclude: list[str] = option(hint="module-name patterns left dense")
    select_after_pruning: bool = option()
    epochs: Optional[int] = option(ge=1, hint=EPOCHS_HINT)


@dataclass
class OneShotOptions:
    """``prune=wanda`` (and the base of ``prune=sparsegpt``): one-shot post-training pruning."""

    final_sparsity: float = option(ge=0, lt=1, hint="fraction of each pruned layer's weights set to zero")
    n: Optional[int] = option(ge=1, hint="null: unstructured; with prune.m: n nonzeros in every m inputs")
    m: Optional[int] = option(ge=2, le=256, hint="null: unstructured; group size of N:M sparsity")
    num_calibration_batches: int = option(ge=1)
    calibration_split: Literal["train", "val"] = option()
    include_classifier: bool = option(hint="prune the output layer (an LM's lm_head) too")
    exclude: list[str] = option(hint="module-name patterns never pruned")
    encoding: Literal[ENCODINGS] = option()
    compression: Literal[COMPRESSIONS] = option()


@dataclass
class SparseGPTOptions(OneShotOptions):
    """``prune=sparsegpt``."""

    blocksize: int = option(ge=1, hint="columns per lazy-update block")
    percdamp: float = option(gt=0, hint="Hessian dampening, a fraction of its mean diagonal")
