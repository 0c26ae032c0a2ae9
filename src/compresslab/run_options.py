"""The run-level numeric and enum options (``seed``, ``dataset.*``, the training recipes,
``measure.*``, ``eval.*``, ``scaling``, ``performance``; ``dataset.*`` is
:class:`compresslab.data.options.DatasetOptions`, which the datamodules check too), declared once as :mod:`compresslab.config_schema`
dataclasses and checked by :func:`check_run_options` before any data is loaded or model trained.

Each schema lists only the keys it checks (``partial``): a dataset or recipe node carries other
settings too (``_target_``, ``root``, ``arch``, the scheduler). Rules that join several keys
(a teacher's epochs only matter when it trains; class-bias labels against the number of classes;
``measure.backends`` against ``export``) stay in ``pipeline.validate`` and its helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

from compresslab.config_schema import check_options, option
from compresslab.data.options import MAX_SEED, DatasetOptions

#: the scalar figures of a results.json row that a search objective (``hydra.sweeper.objectives``) may name
OBJECTIVE_METRICS = (
    "acc_top1", "acc_top1_last", "acc_top1_fit", "val_acc_top1", "acc_top1_bias", "val_acc_top1_bias",
    "size_bytes", "size_ratio", "weight_bytes", "params", "params_nonzero", "sparsity", "macs",
    "latency_ms_b1", "latency_ms_bN", "latency_ms_b1_p90", "latency_ms_bN_p90", "speedup", "speedup_b1",
    "deployed_speedup", "deployed_speedup_b1", "expected_speedup_macs", "expected_speedup_bytes",
    "speedup_vs_expected", "train_time_s",
)


@dataclass
class TopLevelOptions:
    """Keys at the root of the config."""

    partial: ClassVar[bool] = True
    seed: int = option(ge=0, le=MAX_SEED)
    resume: bool = option()


@dataclass
class ScalingOptions:
    """``scaling.*``: the learning-rate rule across processes."""

    lr: Literal["none", "linear", "sqrt"] = option()


@dataclass
class PerformanceOptions:
    """``performance.*``: speed options of every fit."""

    channels_last: Union[bool, Literal["auto"]] = option()
    compile: bool = option()


@dataclass
class OptimizerOptions:
    """``<role>.optimizer`` (any ``torch.optim`` partial; only its learning rate is checked here)."""

    partial: ClassVar[bool] = True
    lr: float = option(gt=0)


@dataclass
class RecipeOptions:
    """``teacher.*`` / ``student.*`` training recipe."""

    partial: ClassVar[bool] = True
    epochs: int = option(ge=1, hint="an untrained model is not a result; for a trained teacher pass teacher.ckpt "
                         "(0 only for a trained checkpoint: <role>=hf_causal_lm)")
    label_smoothing: float = option(ge=0, lt=1)
    optimizer: OptimizerOptions = option()


@dataclass
class PretrainedRecipeOptions(RecipeOptions):
    """The recipe of a model that arrives trained (``hf_causal_lm``): ``epochs=0`` uses it as it is."""

    epochs: int = option(ge=0, hint="0: the trained checkpoint as it is (post-training methods)")


@dataclass
class ReliabilityOptions:
    """``measure.reliability``: the noise gate (docs/measurement.md)."""

    max_spread: float = option(gt=0)
    max_twin_deviation: float = option(gt=0)
    max_ci_width: float = option(gt=0)
    max_other_cpu: float = option(gt=0, le=1)


@dataclass
class MeasureOptions:
    """``measure.*``: the latency engine."""

    latency_warmup: int = option(ge=0)
    latency_rounds: int = option(ge=1)
    latency_round_ms: float = option(gt=0)
    latency_batch: int = option(ge=1)
    clock: Literal["cpu", "wall"] = option()
    threads: Optional[int] = option(ge=1, hint="null: threads_b1 / threads_bN")
    threads_b1: Union[int, Literal["auto"]] = option(ge=1)
    threads_bN: Union[int, Literal["auto"]] = option(ge=1)
    reliability: ReliabilityOptions = option()
    defer: Union[bool, Literal["auto"]] = option()
    fresh_process: bool = option()
    backends: list[str] = option(hint="torch, onnxruntime")


@dataclass
class EvalOptions:
    """``eval.*``: the class bias added at evaluation time."""

    class_bias: Optional[dict[str, Union[float, Literal["val"]]]] = option(hint="{label: value | val}")
    class_bias_grid: list[float] = option()


#: the config nodes checked on every run, with their schema
RUN_NODES = {"dataset": DatasetOptions, "student": RecipeOptions, "measure": MeasureOptions,
             "eval": EvalOptions, "scaling": ScalingOptions,
             "performance": PerformanceOptions}


def check_run_options(cfg: Any) -> None:
    """Check the run-level options of the composed ``cfg`` (a ConfigError naming the key, the
    value and the allowed range); the teacher's recipe only when the teacher will be trained."""
    check_options(TopLevelOptions, {k: cfg[k] for k in ("seed", "resume") if k in cfg}, "")
    for key, schema in RUN_NODES.items():
        if cfg.get(key) is not None:
            check_options(recipe_schema(cfg[key]) if schema is RecipeOptions else schema, cfg[key], key)
    teacher = cfg.get("teacher")
    if teacher is not None and teacher.get("arch") is not None and not teacher.get("ckpt"):
        check_options(recipe_schema(teacher), teacher, "teacher")


def recipe_schema(model_cfg: Any) -> type:
    """:class:`PretrainedRecipeOptions` for a model that arrives trained, else :class:`RecipeOptions`."""
    from compresslab.models.lm import PRETRAINED_FACTORIES

    arch = model_cfg.get("arch") if hasattr(model_cfg, "get") else None
    pretrained = arch is not None and arch.get("_target_") in PRETRAINED_FACTORIES
    return PretrainedRecipeOptions if pretrained else RecipeOptions
