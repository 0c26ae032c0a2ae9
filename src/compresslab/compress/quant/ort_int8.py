"""``quant=ort_int8``: ONNX Runtime's own static int8 quantization, the peer baseline of ``ptq_int8``.

What a deployment engineer would do without compresslab: export the trained fp32 student to
ONNX, run ``onnxruntime.quantization.shape_inference.quant_pre_process`` (shape inference and
ORT's graph optimisation, which folds BatchNorm), then ``onnxruntime.quantization.quantize_static``
in QDQ format, calibrated on the same training batches ``ptq_int8`` uses
(``num_calibration_batches`` of ``calibration_split``). The defaults are the combination that
ORT fuses fully on x86 (uint8 activations, int8 per-channel weights: "U8S8"); ORT's own default,
S8S8 per-tensor, is ``activation_type=int8 per_channel=false`` and leaves convolutions in fp32 (see
docs/deployment.md).

Artifact ``compresslab.onnx_qdq/1`` (:mod:`compresslab.compress.codecs.ort_int8`): the arch spec and
the quantized ONNX model's bytes; its real int8 speed is ONNX Runtime's.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.codecs.ort_int8 import onnx_qdq_payload
from compresslab.compress.quant.ptq import calibration_batches
from compresslab.compress.quant.options import OrtInt8Options
from compresslab.errors import ConfigError

log = logging.getLogger(__name__)


class OrtInt8(CompressionMethod):
    """Static int8 by ``onnxruntime.quantization.quantize_static`` (QDQ)."""

    options = OrtInt8Options

    def __init__(self, name: str, num_calibration_batches: int = 16, calibration_split: str = "train",
                 activation_type: str = "uint8", weight_type: str = "int8", per_channel: bool = True,
                 calibrate_method: str = "MinMax") -> None:
        super().__init__(name)
        try:
            import onnxruntime.quantization  # noqa: F401
        except ImportError as exc:  # a dependency, but say what is missing before any training
            raise ConfigError(f"quant=ort_int8 needs onnxruntime ({exc}); pip install onnxruntime") from exc
        self.num_calibration_batches = int(num_calibration_batches)
        self.calibration_split = calibration_split
        self.activation_type, self.weight_type = activation_type, weight_type
        self.per_channel = bool(per_channel)
        self.calibrate_method = calibrate_method
        self.model_bytes: bytes | None = None
        self._report: dict[str, Any] = {}

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        calibration = calibration_batches(datamodule, self.num_calibration_batches, self.calibration_split)
        start = time.perf_counter()
        self.model_bytes = quantize_with_ort(student, datamodule.input_shape, calibration, self.activation_type,
                                             self.weight_type, self.per_channel, self.calibrate_method)
        from compresslab.deploy.interpret import OnnxGraphModule
        from compresslab.deploy.ort import make_session, optimized_ops_bytes

        torch_form = OnnxGraphModule(self.model_bytes)  # the artifact must run in torch as well
        session = make_session(self.model_bytes, 1)
        x = calibration[0]
        with torch.no_grad():
            sim = torch_form(x)
            fp32 = student.cpu().eval()(x)
        ort_out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        self._report.update({
            "quant_method": self.name,
            "quant_mode": "static",
            "quant_backend": "onnxruntime_quantize_static",
            "compute": "simulated",  # in torch; int8 kernels in ONNX Runtime
            "ort_quant_format": "QDQ",
            "ort_activation_type": self.activation_type,
            "ort_weight_type": self.weight_type,
            "ort_per_channel": self.per_channel,
            "ort_calibrate_method": self.calibrate_method,
            "int8_calibration_batches": len(calibration),
            "int8_convert_time_s": time.perf_counter() - start,
            "ort_int8_ops": optimized_ops_bytes(self.model_bytes),
            "torch_form_vs_ort_max_abs_diff": float((sim - ort_out).abs().max()),
            "int8_vs_fp32_max_abs_diff": float((ort_out - fp32).abs().max()),
            "int8_agreement_top1": float((ort_out.argmax(1) == fp32.argmax(1)).float().mean()),
        })
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict:
        if self.model_bytes is None:
            raise RuntimeError("quant=ort_int8: export before finalize")
        return onnx_qdq_payload(self.model_bytes, context, {
            "quant": self.name, "activation_type": self.activation_type, "weight_type": self.weight_type,
            "per_channel": self.per_channel, "calibrate_method": self.calibrate_method})

    def report(self) -> dict[str, Any]:
        return dict(self._report)


def quantize_with_ort(student: nn.Module, input_shape, calibration: list[torch.Tensor], activation_type: str = "uint8",
                      weight_type: str = "int8", per_channel: bool = True, calibrate_method: str = "MinMax") -> bytes:
    """fp32 ONNX export -> ``quant_pre_process`` -> ``quantize_static`` (QDQ); the quantized model's bytes."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from compresslab.deploy.export import INPUT_NAME, onnx_bytes

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    batches = [x.detach().cpu().float() for x in calibration]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {INPUT_NAME: x.numpy()}

    with tempfile.TemporaryDirectory(prefix="compresslab-ort-int8-") as tmp:
        fp32, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        fp32.write_bytes(onnx_bytes(student.cpu().eval(), torch.zeros(2, *[int(v) for v in input_shape])))
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(out), _Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=qtype[activation_type], weight_type=qtype[weight_type],
                        per_channel=per_channel, calibrate_method=getattr(CalibrationMethod, calibrate_method))
        return out.read_bytes()
