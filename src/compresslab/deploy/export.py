"""ONNX export of every compresslab artifact (``export.onnx=true``), asked of the artifact's codec.

The artifact's ``format`` selects its :class:`~compresslab.artifact.Codec` through the format table
(:func:`compresslab.artifact.codec_of`); deploy never names a method or a format. The codec says
what the exported weights are (``weights``), whether the ONNX form is lossless against the loaded
torch artifact (``lossless``) and, where the ONNX graph is not simply the module its loader builds,
its own ``onnx_form`` (int8: the PT2E QDQ graph, :mod:`compresslab.compress.codecs.int8_onnx`;
``ort_int8``: the stored ONNX Runtime model). Everything else is exported as the loaded module
computes, with :func:`compresslab.runtime.onnx_export.onnx_bytes` (dynamo exporter, opset 18,
dynamic batch): sparse students with dense kernels (ONNX Runtime has no sparse convolution),
structured ones with their smaller shapes, low-rank ones with their factorised layers, low-bit /
weight-shared ones with dequantized fp32 weights.

What each export was is recorded as ``kind`` / ``weights`` / ``lossless`` / ``exporter`` (see
:mod:`compresslab.deploy.step` for the keys).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from compresslab.artifact import DENSE_CODEC, OnnxRequest, codec_of, model_from_payload
from compresslab.files import atomic_write_bytes
from compresslab.runtime.onnx_export import EXPORTER, OPSET, example_input, onnx_bytes


def _info(codec, opset: int) -> dict[str, Any]:
    return {"kind": codec.kind, "weights": codec.onnx_weights, "lossless": codec.lossless, "opset": int(opset),
            "exporter": EXPORTER, "dynamic_batch": True}


def export_payload(payload: Mapping[str, Any], path: Path, calibration: Iterable[torch.Tensor] | None = None,
                   options: Mapping[str, Any] | None = None, opset: int = OPSET) -> dict[str, Any]:
    """Write the ONNX form of an artifact payload (as read by :func:`compresslab.artifact.read_payload`)
    to ``path``; returns what was exported (kind, weights, lossless, exporter, bytes, seconds)."""
    codec = codec_of(payload.get("format"))
    start = time.perf_counter()
    info = _info(codec, opset)
    request = OnnxRequest(example_input(payload["input_shape"]), int(opset), list(calibration or []),
                          dict(options or {}))
    if codec.onnx_form is not None:
        data, extra = codec.onnx_form(payload, request)
        info.update(extra)
    else:
        data = onnx_bytes(model_from_payload(payload), request.example, request.opset)
    atomic_write_bytes(Path(path), data)
    info.update(path=str(path), size_bytes=Path(path).stat().st_size, export_time_s=time.perf_counter() - start)
    return info


def export_module(model: nn.Module, input_shape: Sequence[int], path: Path, opset: int = OPSET) -> dict[str, Any]:
    """Export a dense module (a teacher loaded from a Lightning checkpoint) to ``path``."""
    start = time.perf_counter()
    atomic_write_bytes(Path(path), onnx_bytes(copy.deepcopy(model).cpu().eval(), example_input(input_shape), opset))
    return {**_info(DENSE_CODEC, opset), "path": str(path), "size_bytes": Path(path).stat().st_size,
            "export_time_s": time.perf_counter() - start}
