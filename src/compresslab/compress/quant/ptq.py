"""Post-training int8 quantization methods: ``quant=ptq_int8`` (static) and ``quant=dynamic_int8``.

Static PTQ (Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018; Krishnamoorthi, arXiv:1806.08342, 2018):
per-channel symmetric int8 weights, BN folded into the convolutions, uint8 activations with
ranges calibrated on ``num_calibration_batches`` training batches, run on oneDNN int8
kernels. Dynamic quantization computes activation ranges at run time per batch and
quantizes Linear layers only (what pays off in MLPs and classifier heads).

The PT2E flow lives in :mod:`compresslab.compress.quant.pt2e`, the artifact in
:mod:`compresslab.compress.codecs.int8`. When the int8 path cannot be taken the method
falls back — never silently: the results
carry ``backend`` and ``fallback_reason``:

1. lowering to oneDNN int8 ops fails -> the converted PT2E reference graph (int8 storage,
   fp32 compute on dequantized values: ``compute: simulated``);
2. export / prepare / convert fails -> weight-only per-channel int8 in the bit-packed
   low-bit format (:mod:`compresslab.compress.codecs.lowbit`, ``compute: simulated``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.calibration import calibration_batches
from compresslab.compress.codecs import int8 as int8_pt2e
from compresslab.compress.common import select_layers
from compresslab.compress.quant import pt2e
from compresslab.compress.structure import structure_of
from compresslab.compress.quant.options import PT2EOptions
from compresslab.errors import ConfigError

log = logging.getLogger(__name__)


class PT2EInt8(CompressionMethod):
    """Shared body of the int8 methods: quantize the student at :meth:`finalize` and export the
    rebuilt-on-load int8 artifact (checked by actually loading it once)."""

    codec_kind = "int8"

    mode = "static"

    options = PT2EOptions

    def __init__(self, name: str, num_calibration_batches: int = 16, calibration_split: str = "train",
                 lower: bool = True) -> None:
        super().__init__(name)
        self.num_calibration_batches = int(num_calibration_batches)
        self.calibration_split = calibration_split
        self.lower = bool(lower)
        self.converted: torch.fx.GraphModule | None = None
        self.float_student: nn.Module | None = None
        self.calibration: list[torch.Tensor] = []
        self._report: dict[str, Any] = {}
        self._fallback: str | None = None
        self._payload: dict | None = None

    def quantize(self, student: nn.Module, datamodule) -> None:
        """Run the PT2E flow on the trained student (keeps the float model for the fallback)."""
        self.float_student = student
        self.calibration = calibration_batches(datamodule, self.num_calibration_batches, self.calibration_split)
        example = torch.zeros(2, *datamodule.input_shape)
        try:
            self.converted, info = pt2e.quantize_pt2e(student, example, self.calibration, self.mode)
            self._report.update({f"int8_{k}": v for k, v in info.items()})
        except Exception as exc:  # noqa: BLE001 - documented fallback, reported in results
            log.warning("quant=%s: PT2E quantization failed (%s); falling back to weight-only int8", self.name, exc)
            self.converted = None
            self._fallback = f"PT2E export/prepare/convert failed: {type(exc).__name__}: {exc}"

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        """Quantize, build the artifact and load it once (its figures are this method's report)."""
        self.quantize(student, datamodule)
        self._payload = self._artifact(self.context) if self.context is not None else None
        return student

    def _artifact(self, context) -> dict:
        return self._weight_only_fallback(context) if self.converted is None else self._build(context)

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict:
        """The artifact built (and checked by loading it) at :meth:`finalize` (built here when the
        method was used without :meth:`bind`, outside the pipeline)."""
        if self.float_student is None:
            raise RuntimeError(f"quant={self.name}: export before finalize")
        if self._payload is None:
            self._payload = self._artifact(context)
        return self._payload

    def calibration_data(self) -> list[torch.Tensor]:
        return list(self.calibration)

    def _build(self, context: dict[str, Any]) -> dict:
        structure = structure_of(self.float_student, context)
        x = self.calibration[0] if self.calibration else torch.zeros(2, *context["input_shape"])
        with torch.no_grad():
            ref = self.converted(x)
            fp32 = self.float_student.cpu().eval()(x)
        payload = int8_pt2e.make_payload(self.converted, context, structure, self.mode, self.lower)
        # the artifact is loaded once here: what the pipeline measures must rebuild exactly
        rebuilt = int8_pt2e.rebuild_converted(payload)
        with torch.no_grad():
            if not torch.equal(rebuilt(x), ref):
                raise RuntimeError("int8 artifact: the rebuilt reference graph differs from the converted one")
        backend, fallback = "pt2e_x86_onednn", None
        start = time.perf_counter()
        try:
            if not self.lower:
                raise RuntimeError("lowering disabled (quant.lower=false)")
            loaded = int8_pt2e.load_payload(payload)
            ops = pt2e.int8_ops(loaded.graph)
            if not ops:
                raise RuntimeError("the x86 lowering produced no oneDNN int8 op")
        except Exception as exc:  # noqa: BLE001 - documented fallback, reported in results
            log.warning("quant=%s: int8 lowering unavailable (%s); the artifact runs the reference graph",
                        self.name, exc)
            payload["lower"] = False
            loaded = int8_pt2e.load_payload(payload)
            ops, backend = [], "pt2e_reference_qdq"
            fallback = f"x86 lowering failed: {type(exc).__name__}: {exc}"
        load_time = time.perf_counter() - start
        with torch.no_grad():
            out = loaded(x)
        self._report.update({
            "mode": self.mode,
            "backend": backend,
            "compute": _compute_kind(loaded.graph, ops),
            "int8_ops": ops,
            "fallback_reason": fallback,
            "int8_load_time_s": load_time,
            "int8_sparse_tensors": len(int8_pt2e.sparse_constants(payload)),
            "int8_vs_reference_max_abs_diff": float((out - ref).abs().max()),
            "int8_vs_fp32_max_abs_diff": float((out - fp32).abs().max()),
            "int8_fp32_output_max_abs": float(fp32.abs().max()),
            "int8_agreement_top1": float((out.argmax(1) == fp32.argmax(1)).float().mean()),
        })
        return payload

    def _weight_only_fallback(self, context: dict[str, Any]) -> dict:
        from compresslab.compress.codecs.lowbit import encode_lowbit
        from compresslab.compress.quant.lowbit import strip_lowbit

        student = strip_lowbit(self.float_student)
        names = list(select_layers(student))
        payload, stats = encode_lowbit(student, names, "uniform", 8, True, torch.float32, None, context)
        stats.update(mode=self.mode, backend="weight_only_int8_dequantized",
                     compute="simulated", fallback_reason=self._fallback)
        self._report.update(stats)
        return payload

    def report(self) -> dict[str, Any]:
        return dict(self._report)


def _compute_kind(graph: torch.fx.GraphModule, ops: list[str]) -> str:
    """``int8`` when every conv/linear runs as a oneDNN int8 op, ``mixed`` when some do."""
    if not ops:
        return "simulated"
    float_ops = {"aten.convolution.default", "aten.conv2d.default", "aten.conv1d.default", "aten.linear.default",
                 "aten.addmm.default", "aten.mm.default"}
    left = [n for n in graph.graph.nodes if n.op == "call_function" and str(n.target) in float_ops]
    return "mixed" if left else "int8"


class PTQInt8(PT2EInt8):
    """``quant=ptq_int8``: static post-training int8 (calibrated activations, BN folded)."""

    mode = "static"


class DynamicInt8(PT2EInt8):
    """``quant=dynamic_int8``: int8 weights, activations quantized per batch at run time (Linear layers)."""

    mode = "dynamic"

    def __init__(self, name: str, num_calibration_batches: int = 1, calibration_split: str = "train",
                 lower: bool = True) -> None:
        super().__init__(name, num_calibration_batches, calibration_split, lower)
