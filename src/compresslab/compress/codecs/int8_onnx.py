"""The ONNX form of ``compresslab.int8_pt2e/1`` artifacts: the PT2E reference graph rebuilt from the
artifact (its int8 weights, per-channel scales, activation scales and zero points), exported as
QuantizeLinear/DequantizeLinear pairs that are our calibration, not a second quantization.

X86InductorQuantizer leaves the convolution that feeds a residual ``add`` unquantized at its
output (oneDNN fuses conv+add+relu with an fp32 accumulator), a pattern ONNX Runtime cannot
fuse into QLinearConv: it would run those convolutions in fp32 on dequantized weights.
With ``export.int8_complete_qdq=true`` (default) :func:`complete_qdq` adds a Q/DQ pair on
each such tensor, its scale from the *same* observer PT2E uses (HistogramObserver, uint8
affine) run over the *same* calibration batches (the method's ``calibration_data()``), so ORT
fuses every convolution and add. These added points are counted (``int8_added_qdq``) and their
cost is in the check's ``max_abs_diff`` / ``top1_agreement``; ``false`` exports the exact PT2E graph.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from compresslab.errors import ConfigError


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
