"""The options of every ``conf/quant/*.yaml`` method: types, enums and ranges, declared once
(:mod:`compresslab.config_schema`); each method class points at its schema with ``options = ...``.
Rules between options (PACT's alpha only with scheme=pact, a bit budget between the candidates)
stay in the methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from compresslab.compress.quant.quantizers import ACT_BITS, ACT_SCHEMES, FP32, UNIFORM_BITS
from compresslab.config_schema import option

Split = Literal["train", "val"]
FROM_END = "negative counts from the end of the student fit"
#: one layer's bits in lsq/pact: a width, 32 / 'fp32' (kept fp32), or [w_bits, a_bits]
LayerBits = Union[Literal[(*ACT_BITS, FP32, "fp32")], list[Literal[(*ACT_BITS, FP32)]]]


@dataclass
class PT2EOptions:
    """``quant=ptq_int8`` and ``quant=dynamic_int8``."""

    num_calibration_batches: int = option(ge=1)
    calibration_split: Split = option()
    lower: bool = option()


@dataclass
class QATOptions(PT2EOptions):
    """``quant=qat_int8``."""

    start_epoch: int = option(hint=FROM_END)
    freeze_observer_epoch: Optional[int] = option(hint=f"null: never; {FROM_END}")
    freeze_bn_epoch: Optional[int] = option(hint=f"null: never; {FROM_END}")
    act_momentum: float = option(gt=0, le=1)
    quantize_activations: bool = option()


@dataclass
class OrtInt8Options:
    """``quant=ort_int8`` (the names are ONNX Runtime's ``QuantType`` / ``CalibrationMethod``)."""

    num_calibration_batches: int = option(ge=1)
    calibration_split: Split = option()
    activation_type: Literal["uint8", "int8"] = option()
    weight_type: Literal["int8", "uint8"] = option()
    per_channel: bool = option()
    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] = option()


@dataclass
class LowBitOptions:
    """``quant=lowbit``, ``ternary`` and ``binary``."""

    bits: Literal[(*UNIFORM_BITS, "ternary", "binary")] = option()
    per_channel: bool = option()
    scale_dtype: Literal["float16", "float32"] = option()
    act_bits: Optional[int] = option(ge=2, le=8, hint="null: activations stay fp32")
    act_momentum: float = option(gt=0, le=1)
    keep_first_last: bool = option()
    exclude: list[str] = option(hint="module-name patterns kept fp32")
    start_epoch: int = option(ge=0)


@dataclass
class BitSensitivityOptions:
    """``quant.sensitivity`` of lsq/pact (``bits_per_layer=sensitivity``)."""

    candidates: list[Literal[ACT_BITS]] = option()
    budget_bits: float = option(gt=0)
    batches: int = option(ge=1)


@dataclass
class ActQuantOptions:
    """``quant=lsq`` and ``quant=pact``."""

    scheme: Literal[ACT_SCHEMES] = option()
    weight_bits: int = option(ge=min(ACT_BITS), le=max(ACT_BITS), hint="quant=none for fp32")
    act_bits: int = option(ge=min(ACT_BITS), le=max(ACT_BITS), hint="quant=none for fp32")
    first_last_bits: Optional[LayerBits] = option(hint="null: first and last layers fp32")
    exclude: list[str] = option(hint="module-name patterns kept fp32")
    bits_per_layer: Union[None, Literal["sensitivity"], dict[str, LayerBits]] = option()
    sensitivity: Optional[BitSensitivityOptions] = option()
    alpha_init: Optional[float] = option(gt=0, hint="PACT only")
    alpha_decay: Optional[float] = option(ge=0, hint="PACT only")
    start_epoch: int = option(ge=0)


@dataclass
class WeightSharingOptions:
    """``quant=weight_sharing``."""

    bits_conv: int = option(ge=1, le=16)
    bits_fc: int = option(ge=1, le=16)
    gap_bits_conv: int = option(ge=1, le=16)
    gap_bits_fc: int = option(ge=1, le=16)
    start_epoch: int = option(hint=FROM_END)
    kmeans_iters: int = option(ge=1)
    exclude: list[str] = option(hint="module-name patterns left unshared")
    layout: Literal["auto", "sparse", "dense"] = option()
    unshared_dtype: Literal["float16", "bfloat16", "float32"] = option()


@dataclass
class WeightOnlyOptions:
    """``quant=weight_only``."""

    bits: Literal[8, 4] = option()
    group_size: Optional[int] = option(ge=1, hint="input weights per scale; null = one scale per output channel")
    include_classifier: bool = option()
    exclude: list[str] = option(hint="Linear name patterns left fp32")


@dataclass
class LLMQuantOptions:
    """``quant=rtn`` (and the options ``gptq`` / ``awq`` share with it)."""

    bits: int = option(ge=2, le=8, hint="bits per weight code")
    group_size: Optional[int] = option(ge=1, hint="input weights per scale (must divide every selected Linear's "
                                               "input width); null = one scale per output channel")
    symmetric: bool = option()
    include_classifier: bool = option(hint="quantize the output layer (lm_head) too")
    exclude: list[str] = option(hint="Linear name patterns left fp32")
    num_calibration_batches: int = option(ge=1)
    calibration_split: Split = option()


@dataclass
class GPTQOptions(LLMQuantOptions):
    """``quant=gptq``."""

    damp: float = option(ge=0, lt=1, hint="dampening as a fraction of the mean Hessian diagonal")
    act_order: bool = option()
    block_size: int = option(ge=1)


@dataclass
class AWQOptions(LLMQuantOptions):
    """``quant=awq``."""

    n_grid: int = option(ge=2, le=1000, hint="exponents alpha = k / n_grid searched")


@dataclass
class SmoothQuantOptions:
    """``quant=smoothquant``."""

    alpha: float = option(ge=0, le=1, hint="migration strength")
    include_classifier: bool = option(hint="quantize the output layer (lm_head) too")
    exclude: list[str] = option(hint="Linear name patterns left fp32")
    num_calibration_batches: int = option(ge=1)
    calibration_split: Split = option()
