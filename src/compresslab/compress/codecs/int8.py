"""``compresslab.int8_pt2e/1``: the int8 model of ``quant=ptq_int8`` / ``dynamic_int8`` / ``qat_int8``.

No serialized graph (``torch.export.load`` may unpickle parts of a .pt2 archive) but plain data:
the arch spec (+ low-rank plan), the converted graph's constants (int8 weights, per-channel scales
and zero points, fp32 folded biases) and the activation quantization parameters of each
quantize/dequantize node, in graph order. :func:`load_payload` rebuilds the converted graph by
running the same deterministic export/prepare/convert
(:mod:`compresslab.compress.quant.pt2e`) on a freshly built model, checks that the graph
has exactly the saved constants and q/dq nodes, overwrites them, and lowers it. Rebuild +
lowering take seconds (reported as ``int8_load_time_s``); latency is measured after warm-up.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import nn

from compresslab.compress.codecs.bitpack import dtype_from_name, dtype_name
from compresslab.compress.codecs.sparse import decode_state_dict, pack_state, sparse_names
from compresslab.artifact import Codec, OnnxRequest, context_fields
from compresslab.compress.codecs.int8_onnx import complete_qdq
from compresslab.compress.quant.pt2e import (
    example_input,
    graph_constants,
    graph_qparams,
    int8_ops,
    lower_x86,
    qparam_nodes,
    quantize_pt2e,
    register_flop_formulas,
)
from compresslab.compress.structure import build_structure
from compresslab.errors import CheckpointError

FORMAT = "compresslab.int8_pt2e/1"


def _set_attr(gm: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the graph constant ``target`` (a parameter, buffer or plain attribute) by ``value``."""
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def _compact(constants: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store int64 zero points as int8 when lossless; returns (tensors, original dtype by name)."""
    out, dtypes = {}, {}
    for name, t in constants.items():
        dtypes[name] = dtype_name(t.dtype)
        if t.dtype == torch.int64 and (t.numel() == 0 or (int(t.min()) >= -128 and int(t.max()) <= 127)):
            t = t.to(torch.int8)
        out[name] = t
    return out, dtypes


def make_payload(converted: torch.fx.GraphModule, context: Mapping[str, Any], structure: Mapping[str, Any],
                 mode: str, lower: bool, meta: Mapping[str, Any] | None = None) -> dict:
    """The plain-data int8 artifact of a converted graph.

    The constants go through the shared sparse layer (:func:`~compresslab.compress.codecs.sparse.pack_state`):
    dense int8 weights are stored as they are, while the weights of a pruned student (whose
    zeros stay exactly 0 under symmetric per-channel quantization) take the cheaper bitmask or
    index layout, so pruning and int8 stack in the file size.
    """
    constants, dtypes = _compact(graph_constants(converted))
    return {
        **context_fields(FORMAT, context),
        "structure": dict(structure or {}),
        "mode": mode,
        "lower": bool(lower),
        "constants": pack_state(constants),
        "constants_dtype": dtypes,
        "qparams": graph_qparams(converted),
        "torch_version": str(torch.version.__version__),
        "meta": dict(meta or {}),
    }


def stored_constants(payload: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The graph constants an int8 payload stores (int8 weights, scales, zero points, biases),
    as stored (zero points compacted to int8)."""
    return dict(decode_state_dict(payload["constants"]))


def sparse_constants(payload: Mapping[str, Any]) -> list[str]:
    """Names of the constants stored in a sparse (bitmask / index) layout."""
    return sparse_names(payload["constants"])


def rebuild_converted(payload: Mapping[str, Any]) -> torch.fx.GraphModule:
    """Re-run export/prepare/convert on a fresh model and install the saved constants and qparams."""
    model = build_structure(payload["arch"], payload["input_shape"], payload["num_classes"],
                            payload.get("structure")).eval()
    example = example_input(payload["input_shape"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # observers that saw only zeros warn; their values are replaced
        skeleton, _ = quantize_pt2e(model, example, [example], payload["mode"])
    saved = stored_constants(payload)
    names = graph_constants(skeleton)
    if set(names) != set(saved):
        raise CheckpointError(
            "int8 artifact does not match the graph rebuilt from its architecture (different torch/torchao "
            f"version or model code?): missing {sorted(set(names) - set(saved))[:4]}, "
            f"unexpected {sorted(set(saved) - set(names))[:4]}")
    for name, value in saved.items():
        value = value.to(dtype_from_name(payload["constants_dtype"][name]))
        if tuple(value.shape) != tuple(names[name].shape):
            raise CheckpointError(f"int8 artifact: {name} has shape {tuple(value.shape)}, "
                                  f"the rebuilt graph expects {tuple(names[name].shape)}")
        _set_attr(skeleton, name, value)
    qnodes = qparam_nodes(skeleton)
    qparams = payload["qparams"]
    if len(qnodes) != len(qparams):
        raise CheckpointError(f"int8 artifact has {len(qparams)} activation qparams, the rebuilt graph "
                              f"{len(qnodes)} quantize/dequantize nodes")
    for node, (scale, zp) in zip(qnodes, qparams):
        args = list(node.args)
        args[1], args[2] = float(scale), int(zp)
        node.args = tuple(args)
    skeleton.recompile()
    return skeleton


class Int8Model(nn.Module):
    """A loaded int8 artifact: the lowered (or reference) graph, plus the stored int8 weights and
    fp32 biases registered as frozen parameters so parameter counts and sparsity are measurable."""

    def __init__(self, graph: torch.fx.GraphModule, weights: Mapping[str, torch.Tensor], compute: str) -> None:
        super().__init__()
        self.graph = graph
        self.compute = compute
        self.stored = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in weights.values()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> "Int8Model":
        # exported graphs refuse train()/eval(); an inference artifact has no training mode
        self.training = False
        return self


def _stored_weights(converted: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The int8 weight and fp32 bias constants (not scales / zero points)."""
    out = {}
    for name, t in graph_constants(converted).items():
        leaf = name.rpartition(".")[2]
        if leaf.startswith(("_scale", "_zero_point")):
            continue
        out[name] = t
    return out


def load_payload(payload: dict) -> nn.Module:
    """Rebuild a working int8 model from an :data:`FORMAT` payload (see the module doc)."""
    register_flop_formulas()
    converted = rebuild_converted(payload)
    weights = _stored_weights(converted)
    if payload.get("lower", True):
        lowered = lower_x86(converted, example_input(payload["input_shape"]))
        return Int8Model(lowered, weights, "int8" if int8_ops(lowered) else "simulated")
    return Int8Model(converted, weights, "simulated")


def int8_onnx_form(payload: Mapping[str, Any], request: OnnxRequest) -> tuple[bytes, dict]:
    """The ONNX form: the rebuilt PT2E reference graph as QDQ, completed for ONNX Runtime's fusion
    with ``export.int8_complete_qdq`` (:mod:`compresslab.compress.codecs.int8_onnx`)."""
    from compresslab.runtime.onnx_export import onnx_bytes

    data = onnx_bytes(rebuild_converted(payload), request.example, request.opset)
    info: dict[str, Any] = {"int8_mode": payload.get("mode"), "int8_added_qdq": 0, "int8_qdq": "exact PT2E graph"}
    if bool(request.options.get("int8_complete_qdq", True)) and payload.get("mode") == "static":
        data, added = complete_qdq(data, list(request.calibration))
        info["int8_added_qdq"] = added
        info["int8_qdq"] = "completed for ONNX Runtime fusion" if added else "exact PT2E graph"
    return data, info


CODEC = Codec(FORMAT, kind="int8", lossless=False, onnx_weights="int8 QDQ (PT2E scales and zero points)",
              onnx_form=int8_onnx_form)
