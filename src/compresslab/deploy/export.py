"""ONNX export of every compresslab artifact (``export.onnx=true``).

Exporter: ``torch.onnx.export(..., dynamo=True)``, the maintained exporter (``torch.export`` +
onnxscript's torchlib); the TorchScript-based one is deprecated and cannot translate the PT2E
``quantized_decomposed`` ops that carry our int8 scales. Opset 18, the batch dimension dynamic
(``batch``), input ``input``, output ``logits``, one self-contained file (no external data).

What each artifact kind becomes (recorded as ``kind`` / ``weights`` / ``lossless``):

- dense, unstructured-sparse, structured-pruned, low-rank: the loaded fp32 module as it
  computes. Sparse students are exported with **dense kernels** (ONNX Runtime has no sparse
  convolution; the zeros are stored and multiplied); structured students with their smaller
  shapes; low-rank students with their factorised layers.
- low-bit / ternary / binary / weight-shared: **dequantized fp32 weights** (ONNX has no packed
  form for 1-4-bit codes or codebooks that ORT executes); fake-quantized activations
  (``quant.act_bits``) are exported as the round/clamp ops they are.
- int8 (``ptq_int8``, ``qat_int8``, ``dynamic_int8``): the PT2E reference graph rebuilt from the
  artifact (its int8 weights, per-channel scales, activation scales and zero points), so the
  exported QuantizeLinear/DequantizeLinear pairs are our calibration, not a second quantization.
  X86InductorQuantizer leaves the convolution that feeds a residual ``add`` unquantized at its
  output (oneDNN fuses conv+add+relu with an fp32 accumulator), a pattern ONNX Runtime cannot
  fuse into QLinearConv: it would run those convolutions in fp32 on dequantized weights.
  With ``export.int8_complete_qdq=true`` (default) :func:`complete_qdq` adds a Q/DQ pair on
  each such tensor, its scale from the *same* observer PT2E uses (HistogramObserver, uint8
  affine) run over the *same* calibration batches, so ORT fuses every convolution and add.
  These added points are counted (``int8_added_qdq``) and their cost is in the check's
  ``max_abs_diff`` / ``top1_agreement``; ``false`` exports the exact PT2E graph.
- ``ort_int8``: its artifact *is* an ONNX model (ONNX Runtime's own quantizer); written as is.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from compresslab.errors import ConfigError

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
_MAX_BATCH = 1 << 16

#: artifact format -> (kind, what the exported weights are, lossless vs the torch artifact)
KINDS: dict[str, tuple[str, str, bool]] = {
    "compresslab.dense/1": ("dense", "fp32", True),
    "compresslab.fused/1": ("fused", "fp32, BatchNorm folded", True),
    "compresslab.sparse/1": ("sparse", "fp32 dense kernels (ONNX Runtime has no sparse convolution; zeros are "
                                       "stored and multiplied)", True),
    "compresslab.structured/1": ("structured", "fp32, pruned (smaller) shapes", True),
    "compresslab.lowrank/1": ("lowrank", "fp32, factorised layers", True),
    "compresslab.lowbit/1": ("lowbit", "dequantized fp32 (no packed low-bit form in ONNX Runtime)", True),
    "compresslab.actquant/1": ("actquant", "dequantized fp32 weights (no packed low-bit form in ONNX Runtime); "
                                           "activations fake-quantized with the learned LSQ/PACT steps as "
                                           "round/clamp ops", False),
    "compresslab.shared/1": ("weight_shared", "dequantized fp32 (codebooks/Huffman have no ONNX Runtime form)", True),
    "compresslab.int8_pt2e/1": ("int8", "int8 QDQ (PT2E scales and zero points)", False),
    "compresslab.onnx_qdq/1": ("ort_int8", "int8 QDQ (ONNX Runtime quantize_static)", False),
    "compresslab.nm/1": ("nm", "fp32 dense kernels (ONNX Runtime has no N:M sparse kernel; zeros are stored and "
                               "multiplied)", True),
    "compresslab.weight_only/1": ("weight_only", "dequantized fp32 (the exporter folds torchao's int8/int4 "
                                                 "weight-only tensors into fp32 constants)", False),
}


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=_MAX_BATCH)


def onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int = OPSET) -> bytes:
    """Serialized ONNX model of ``model(example)`` with a dynamic batch dimension (dynamo exporter)."""
    model = model.eval() if not isinstance(model, torch.fx.GraphModule) else model
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


def _example(input_shape: Sequence[int], batch: int = 2) -> torch.Tensor:
    return torch.zeros(batch, *[int(v) for v in input_shape])


def export_payload(payload: Mapping[str, Any], path: Path, calibration: Iterable[torch.Tensor] | None = None,
                   complete_int8: bool = True, opset: int = OPSET) -> dict[str, Any]:
    """Write the ONNX form of an artifact payload (as read by :func:`compresslab.artifact.read_payload`)
    to ``path``; returns what was exported (kind, weights, exporter, bytes, seconds)."""
    from compresslab.artifact import model_from_payload

    fmt = payload.get("format")
    # a format without an entry here exports the module its loader builds, checked as a lossy kind
    kind, weights, lossless = KINDS.get(fmt, (str(fmt), "as the torch artifact computes", False))
    start = time.perf_counter()
    info: dict[str, Any] = {"kind": kind, "weights": weights, "lossless": lossless, "opset": int(opset),
                            "exporter": "torch.onnx.export(dynamo=True)", "dynamic_batch": True}
    example = _example(payload["input_shape"])
    if kind == "ort_int8":
        data = payload_onnx_bytes(payload)
        info["exporter"] = "onnxruntime.quantization.quantize_static (stored in the artifact)"
    elif kind == "int8":
        from compresslab.compress.codecs import int8 as pt2e

        converted = pt2e.rebuild_converted(payload)
        data = onnx_bytes(converted, example, opset)
        info["int8_mode"] = payload.get("mode")
        if complete_int8 and payload.get("mode") == "static":
            data, added = complete_qdq(data, list(calibration or []))
            info["int8_added_qdq"] = added
            info["int8_qdq"] = "completed for ONNX Runtime fusion" if added else "exact PT2E graph"
        else:
            info["int8_added_qdq"] = 0
            info["int8_qdq"] = "exact PT2E graph"
    else:
        model = model_from_payload(payload)
        if kind == "lowbit" and payload.get("act_bits") is not None:
            info["lossless"] = lossless = False  # rounding at fake-quantized activations can differ by one step
            info["weights"] += f"; activations fake-quantized to {payload['act_bits']} bits"
        data = onnx_bytes(model, example, opset)
    from compresslab.files import atomic_write_bytes

    atomic_write_bytes(Path(path), data)
    info.update(path=str(path), size_bytes=Path(path).stat().st_size, export_time_s=time.perf_counter() - start)
    return info


def export_module(model: nn.Module, input_shape: Sequence[int], path: Path, opset: int = OPSET) -> dict[str, Any]:
    """Export a dense module (a teacher loaded from a Lightning checkpoint) to ``path``."""
    from compresslab.files import atomic_write_bytes

    start = time.perf_counter()
    atomic_write_bytes(Path(path), onnx_bytes(copy.deepcopy(model).cpu().eval(), _example(input_shape), opset))
    kind, weights, lossless = KINDS["compresslab.dense/1"]
    return {"kind": kind, "weights": weights, "lossless": lossless, "opset": int(opset),
            "exporter": "torch.onnx.export(dynamo=True)", "dynamic_batch": True, "path": str(path),
            "size_bytes": Path(path).stat().st_size, "export_time_s": time.perf_counter() - start}


def payload_onnx_bytes(payload: Mapping[str, Any]) -> bytes:
    """The ONNX model bytes stored in an ``ort_int8`` artifact (a uint8 tensor)."""
    blob = payload.get("onnx")
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        from compresslab.errors import CheckpointError

        raise CheckpointError("ort_int8 artifact: 'onnx' must be a 1-D uint8 tensor holding an ONNX model")
    return blob.numpy().tobytes()


# ---- completing the int8 QDQ graph for ONNX Runtime's fusion ----------------------------------
_FLOAT_PRODUCERS = ("Conv", "Gemm", "MatMul")


def complete_qdq(model_bytes: bytes, calibration: Sequence[torch.Tensor]) -> tuple[bytes, int]:
    """Add QuantizeLinear/DequantizeLinear on every fp32 conv/gemm output that feeds an ``Add``
    (see the module doc), calibrated with PT2E's activation observer on ``calibration``.
    Returns (model bytes, number of tensors quantized)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    targets: list[str] = []
    for node in graph.node:
        if node.op_type != "Add":
            continue
        for name in node.input:
            src = producer.get(name)
            if src is not None and src.op_type in _FLOAT_PRODUCERS and name not in targets:
                targets.append(name)
    if not targets:
        return model_bytes, 0
    if not calibration:
        raise ConfigError("export.int8_complete_qdq needs the calibration batches of the int8 method")
    observed = _observe(model, targets, calibration)
    qparams = {name: _observer_qparams(values) for name, values in observed.items()}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    new_nodes = []
    for k, name in enumerate(targets):
        scale, zero = qparams[name]
        s_name, z_name = f"cl_qdq_{k}_scale", f"cl_qdq_{k}_zero_point"
        graph.initializer.append(numpy_helper.from_array(_np_scalar(scale, "float32"), s_name))
        graph.initializer.append(numpy_helper.from_array(_np_scalar(zero, "uint8"), z_name))
        q_out, dq_out = f"{name}_cl_q", f"{name}_cl_dq"
        for node, i in consumers.get(name, []):
            node.input[i] = dq_out
        new_nodes.append((name, [helper.make_node("QuantizeLinear", [name, s_name, z_name], [q_out], name=f"cl_q_{k}"),
                                 helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                                                  name=f"cl_dq_{k}")]))
    # keep topological order: insert each pair right after its producer
    order = list(graph.node)
    for name, pair in new_nodes:
        at = next(i for i, n in enumerate(order) if name in n.output)
        order[at + 1:at + 1] = pair
    del graph.node[:]
    graph.node.extend(order)
    onnx.checker.check_model(model)
    return model.SerializeToString(), len(targets)


def _np_scalar(value, dtype: str):
    import numpy as np

    return np.array(value, dtype=dtype)


def _observe(model, names: Sequence[str], calibration: Sequence[torch.Tensor]) -> dict[str, list]:
    """Values of the graph tensors ``names`` on the calibration batches (ONNX Runtime, basic optimisation
    so the tensors keep their names)."""
    import onnx
    import onnxruntime as ort

    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    values: dict[str, list] = {name: [] for name in names}
    for x in calibration:
        got = dict(zip(outputs, session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})))
        for name in names:
            values[name].append(torch.from_numpy(got[name]))
    return values


def _observer_qparams(values: Sequence[torch.Tensor]) -> tuple[float, int]:
    """(scale, zero point) from the activation observer of the x86 quantizer's default static config
    (the one ``ptq_int8``/``qat_int8`` calibrate with), fed ``values`` batch by batch."""
    from compresslab.compress.quant.pt2e import quantizer_for

    spec = quantizer_for("static").global_config.input_activation
    observer = spec.observer_or_fake_quant_ctr()
    for v in values:
        observer(v.float())
    scale, zero = observer.calculate_qparams()
    return float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0])
