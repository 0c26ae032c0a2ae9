"""``compresslab.onnx_qdq/1``: the int8 model of ``quant=ort_int8`` as the arch spec and the
quantized ONNX model's bytes (a uint8 tensor); ``export.onnx=true`` writes those bytes as
``student.onnx``. In torch, :func:`load_payload` runs it through
:class:`compresslab.runtime.interpret.OnnxGraphModule` (fake-quantized activations at ORT's points,
dequantized weights: ``compute: simulated``); its real int8 speed is ONNX Runtime's.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from compresslab.artifact import Codec, OnnxRequest, context_fields
from compresslab.errors import CheckpointError

FORMAT = "compresslab.onnx_qdq/1"


def payload_onnx_bytes(payload: Mapping[str, Any]) -> bytes:
    """The ONNX model bytes stored in an ``ort_int8`` artifact (a uint8 tensor)."""
    blob = payload.get("onnx")
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise CheckpointError("ort_int8 artifact: 'onnx' must be a 1-D uint8 tensor holding an ONNX model")
    return blob.numpy().tobytes()


def _onnx_form(payload: Mapping[str, Any], request: OnnxRequest) -> tuple[bytes, dict]:
    """The artifact *is* an ONNX model (ONNX Runtime's own quantizer): written as it is."""
    return payload_onnx_bytes(payload), {"exporter": "onnxruntime.quantization.quantize_static (stored in the artifact)"}


CODEC = Codec(FORMAT, kind="ort_int8", lossless=False, onnx_weights="int8 QDQ (ONNX Runtime quantize_static)",
              onnx_form=_onnx_form)


def onnx_qdq_payload(model_bytes: bytes, context: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> dict:
    """The plain-data artifact of a quantized ONNX model (its bytes as a uint8 tensor)."""
    return {
        **context_fields(FORMAT, context),
        "onnx": torch.frombuffer(bytearray(model_bytes), dtype=torch.uint8),
        "meta": dict(meta or {}),
    }


def load_payload(payload: dict) -> nn.Module:
    """The torch form of a :data:`FORMAT` artifact (see the module doc)."""
    from compresslab.runtime.interpret import OnnxGraphModule

    try:
        return OnnxGraphModule(payload_onnx_bytes(payload)).eval()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged model proto
        raise CheckpointError(f"ort_int8 artifact: its ONNX model cannot be read ({type(exc).__name__}: {exc})") from exc
