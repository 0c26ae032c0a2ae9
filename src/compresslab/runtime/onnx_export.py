"""A torch module as ONNX bytes: ``torch.onnx.export(..., dynamo=True)``, the maintained exporter
(``torch.export`` + onnxscript's torchlib); the TorchScript-based one is deprecated and cannot
translate the PT2E ``quantized_decomposed`` ops that carry int8 scales. Opset 18 by default, the
batch dimension dynamic (``batch``), input ``input``, output ``logits``, one self-contained model
(no external data), the exporter's per-node debug metadata stripped.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch
from torch import nn

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXPORTER = "torch.onnx.export(dynamo=True)"
_MAX_BATCH = 1 << 16


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=_MAX_BATCH)


def example_input(input_shape: Sequence[int], batch: int = 2) -> torch.Tensor:
    """Zeros of ``(batch, *input_shape)``: the example an export traces."""
    return torch.zeros(batch, *[int(v) for v in input_shape])


def onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int = OPSET) -> bytes:
    """Serialized ONNX model of ``model(example)`` with a dynamic batch dimension (dynamo exporter).
    A model that declares ``input_dtype`` (a causal LM: token ids) is traced with the example in it."""
    model = model.eval() if not isinstance(model, torch.fx.GraphModule) else model
    example = example.to(getattr(model, "input_dtype", example.dtype))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _quiet_exporter()
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=int(opset),
                                    dynamic_shapes=({0: _batch_dim()},), input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], optimize=True, verbose=False,
                                    external_data=False)
    proto = program.model_proto
    _strip_debug_info(proto)
    return proto.SerializeToString()


def _strip_debug_info(proto) -> None:
    """Drop the exporter's per-node debug metadata (source stack traces, FX node names): on resnet20's
    int8 graph it is 40% of the file; the graph and its tensors are unchanged."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        del value.metadata_props[:]
    for init in proto.graph.initializer:
        del init.metadata_props[:]


def _quiet_exporter() -> None:
    """The dynamo exporter prints progress lines through the ``torch.onnx`` loggers."""
    for name in ("torch.onnx", "torch.onnx._internal.exporter._core", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
