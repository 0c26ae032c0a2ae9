"""``quant=weight_only``: int8 / int4 weight-only quantization of Linear layers with torchao's
public configs (``quantize_``), per output channel or in groups of ``group_size`` input weights
(the GPTQ/AWQ-era deployment format for transformers; Frantar et al., "GPTQ", ICLR 2023, use
the same grouped layout with round-to-nearest as their baseline, which is what this is).

Configs, as of torchao 0.18 on CPU: ``bits=8`` is ``Int8WeightOnlyConfig`` (symmetric,
``PerRow`` or ``PerGroup``: an ``Int8Tensor``); ``bits=4`` is ``IntxWeightOnlyConfig(weight_dtype=
torch.int4)`` (symmetric, ``PerAxis(0)`` or ``PerGroup``: an ``IntxUnpackedToInt8Tensor``),
because ``Int4WeightOnlyConfig``'s packings need CUDA (tinygemm tile packing, ``mslk``) and refuse
CPU tensors. On CPU both run as dequantize-then-fp32-matmul inside torchao (no int8/int4
weight-only GEMM that beats fp32 on x86 here: torch's ``_weight_int8pack_mm`` /
``_weight_int4pack_mm_for_cpu`` measured 8-90x slower than fp32 at these sizes), so the gain is
size, not speed; the latency in results.json says what the kernels do.

A Linear whose input width is not a multiple of ``group_size`` stays fp32 (torchao would skip it
too) and is listed under ``skipped``. The artifact packs the codes (:mod:`compresslab.compress.codecs.weight_only`).
With ``export=onnx`` the dynamo exporter folds the torchao weights into fp32 constants: ONNX Runtime
then runs the dequantized fp32 model (same outputs, fp32-sized file), recorded under ``onnx.weights``.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.codecs.weight_only import packed_bytes, weight_only_payload
from compresslab.compress.common import select_layers
from compresslab.compress.quant.options import WeightOnlyOptions
from compresslab.compress.structure import rebuildable_from_spec, structure_of
from compresslab.errors import ConfigError

log = logging.getLogger(__name__)

BITS = (8, 4)


def torchao_config(bits: int, group_size: int | None):
    """The torchao config of ``bits``-bit weight-only quantization (per channel when ``group_size`` is None)."""
    from torchao.quantization import (
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
        PerRow,
    )

    if bits == 8:
        return Int8WeightOnlyConfig(granularity=PerRow() if group_size is None else PerGroup(group_size))
    return IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                granularity=PerAxis(0) if group_size is None else PerGroup(group_size))


class WeightOnlyQuant(CompressionMethod):
    """Weight-only int8/int4 Linear quantization after training (see the module docstring).

    ``bits``: 8 or 4. ``group_size``: input weights sharing one scale (null: one per output
    channel). ``include_classifier``: quantize the output layer too. ``exclude``: Linear
    name patterns left fp32.
    """

    options = WeightOnlyOptions
    codec_kind = "weight_only"

    def __init__(self, name: str, bits: int = 8, group_size: int | None = 32, include_classifier: bool = True,
                 exclude: Sequence[str] = ()) -> None:
        super().__init__(name)
        if int(bits) not in BITS:
            raise ConfigError(f"quant.bits must be one of {BITS} for quant=weight_only, got {bits}")
        self.bits = int(bits)
        if group_size is not None and int(group_size) < 1:
            raise ConfigError(f"quant.group_size must be a positive int or null (per channel), got {group_size}")
        self.group_size = None if group_size is None else int(group_size)
        self.include_classifier = bool(include_classifier)
        self.exclude = list(exclude or [])
        self._layers: list[str] = []
        self._skipped: list[str] = []
        self._report: dict[str, Any] = {}

    def select(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """(Linear layers quantized, selected Linear layers skipped because of ``group_size``)."""
        linears = select_layers(model, self.exclude, types=(nn.Linear,), include_classifier=self.include_classifier)
        g = self.group_size
        keep = [n for n, m in linears.items() if g is None or m.in_features % g == 0]
        return keep, [n for n in linears if n not in keep]

    def validate_student(self, student: nn.Module, datamodule) -> None:
        keep, skipped = self.select(student)
        if not keep:
            raise ConfigError(f"quant=weight_only: no selected Linear layer can be quantized (group_size="
                              f"{self.group_size} divides none of their input widths; skipped {skipped[:6]}); "
                              "set quant.group_size to a divisor of the input widths, or null for per-channel")

    @torch.no_grad()
    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        from torchao.quantization import quantize_

        student = student.cpu().eval()
        self._layers, self._skipped = self.select(student)
        wanted = set(self._layers)
        fp32_bytes = sum(student.get_submodule(n).weight.numel() * 4 for n in self._layers)
        config = torchao_config(self.bits, self.group_size)
        quantize_(student, config, filter_fn=lambda module, fqn: fqn in wanted)
        kinds = sorted({type(student.get_submodule(n).weight).__name__ for n in self._layers})
        packed = packed_bytes({n: student.get_submodule(n).weight for n in self._layers}, self.bits)
        self._report = {"quant_method": self.name, "bits": self.bits, "group_size": self.group_size,
                        "torchao_config": type(config).__name__, "tensor_types": kinds,
                        "layers": list(self._layers), "skipped": list(self._skipped),
                        "linear_fp32_bytes": fp32_bytes, "linear_packed_bytes": packed,
                        "linear_packed_vs_fp32": packed / max(1, fp32_bytes),
                        "kernel": "torchao dequantize + fp32 matmul (CPU)",
                        "onnx": "exported as dequantized fp32 constants (no weight-only int8/int4 Linear in ORT's graph)"}
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict | None:
        structure = structure_of(student, context)  # a low-rank plan / pruned shapes from an earlier axis
        if not rebuildable_from_spec(student, {**context, "structure": structure}):
            raise ConfigError(f"quant={self.name}: the student's modules no longer match its arch spec (another "
                              "method changed the structure); weight-only int8/int4 is saved as spec + weights")
        return weight_only_payload(student, context, self._layers, self.bits, structure=structure,
                                   meta={"quant": self.name, "bits": self.bits, "group_size": self.group_size})

    def report(self) -> dict[str, Any]:
        return dict(self._report)
