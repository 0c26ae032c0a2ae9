"""Running an ONNX graph with torch ops: the torch form of an ``ort_int8`` artifact.

ONNX Runtime's quantizer (``quant=ort_int8``) produces a QDQ ONNX model, not a torch module, yet
every compresslab artifact must also run in torch (accuracy, params and MACs are measured there,
and ``measure.backends=[torch, ...]`` times it). :class:`OnnxGraphModule` executes the graph node
by node with torch functions: ``QuantizeLinear``/``DequantizeLinear`` as the integer rounding and
clamping they define (so activations are fake-quantized at exactly ORT's points with ORT's scales),
int8 weights dequantized once at load, convolutions and GEMMs in fp32. That is *simulated* int8
(``compute: simulated``), the same model computed in floating point.

Safety: an ``op_type`` read from the file only selects an entry of :data:`OPS`, a fixed table of
functions written here; anything else is refused with the list of supported operators. Tensors
are read with ``onnx.numpy_helper`` (protobuf data, no code).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compresslab.errors import CheckpointError

_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _axis_view(t: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[axis % like.dim()] = t.numel()
    return t.reshape(shape)


def _quantize(node, x, scale, zero=None):
    axis = int(node.attrs.get("axis", 1))
    dtype = node.zp_dtype.get(1 if zero is None else 2, torch.uint8)
    qmin, qmax = _QRANGE.get(dtype, (0, 255))
    z = 0.0 if zero is None else _axis_view(zero.float(), x, axis)
    return torch.clamp(torch.round(x / _axis_view(scale, x, axis)) + z, qmin, qmax)


def _dequantize(node, x, scale, zero=None):
    axis = int(node.attrs.get("axis", 1))
    z = 0.0 if zero is None else _axis_view(zero.float(), x, axis)
    return (x.float() - z) * _axis_view(scale.float(), x, axis)


def _pad_input(x, node, dims: int, value: float = 0.0):
    """ONNX pads ``[b1, .., bn, e1, .., en]``: symmetric ones go to the op, others to ``F.pad``."""
    pads = list(node.attrs.get("pads", [0] * (2 * dims)))
    begin, end = pads[:dims], pads[dims:]
    if begin == end:
        return x, begin
    pad = []
    for b, e in zip(reversed(begin), reversed(end)):
        pad += [b, e]
    return F.pad(x, pad, value=value), [0] * dims


def _check_auto_pad(node):
    if node.attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise CheckpointError(f"ONNX {node.op_type}: auto_pad={node.attrs['auto_pad']!r} is not supported")


def _conv(node, x, w, b=None):
    _check_auto_pad(node)
    dims = w.dim() - 2
    x, pad = _pad_input(x, node, dims)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return fn(x, w, b, stride=list(node.attrs.get("strides", [1] * dims)), padding=pad,
              dilation=list(node.attrs.get("dilations", [1] * dims)), groups=int(node.attrs.get("group", 1)))


def _gemm(node, a, b, c=None):
    if node.attrs.get("transA", 0):
        a = a.t()
    if node.attrs.get("transB", 0):
        b = b.t()
    out = float(node.attrs.get("alpha", 1.0)) * (a @ b)
    return out if c is None else out + float(node.attrs.get("beta", 1.0)) * c


def _maxpool(node, x):
    _check_auto_pad(node)
    dims = x.dim() - 2
    x, pad = _pad_input(x, node, dims, value=float("-inf"))
    fn = {1: F.max_pool1d, 2: F.max_pool2d}[dims]
    kernel = list(node.attrs["kernel_shape"])
    return fn(x, kernel, stride=list(node.attrs.get("strides", [1] * dims)), padding=pad,
              dilation=list(node.attrs.get("dilations", [1] * dims)), ceil_mode=bool(node.attrs.get("ceil_mode", 0)))


def _avgpool(node, x):
    _check_auto_pad(node)
    dims = x.dim() - 2
    x, pad = _pad_input(x, node, dims)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d}[dims]
    return fn(x, list(node.attrs["kernel_shape"]), stride=list(node.attrs.get("strides", [1] * dims)), padding=pad,
              ceil_mode=bool(node.attrs.get("ceil_mode", 0)),
              count_include_pad=bool(node.attrs.get("count_include_pad", 0)))


def _reduce_mean(node, x, axes=None):
    keep = bool(node.attrs.get("keepdims", 1))
    if axes is None:
        axes = node.attrs.get("axes")
    if axes is None:
        return x.mean() if not keep else x.mean(dim=tuple(range(x.dim())), keepdim=True)
    return x.mean(dim=[int(a) for a in (axes.tolist() if isinstance(axes, torch.Tensor) else axes)], keepdim=keep)


def _reshape(node, x, shape):
    shape = [int(v) for v in shape.tolist()]
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _flatten(node, x):
    axis = int(node.attrs.get("axis", 1)) % max(1, x.dim())
    return x.reshape(int(np.prod(x.shape[:axis])) if axis else 1, -1)


def _squeeze(node, x, axes=None):
    if axes is None:
        return x.squeeze()
    for a in sorted((int(v) % x.dim() for v in axes.tolist()), reverse=True):
        x = x.squeeze(a)
    return x


def _unsqueeze(node, x, axes):
    out_dims = x.dim() + axes.numel()
    for a in sorted(int(v) % out_dims for v in axes.tolist()):
        x = x.unsqueeze(a)
    return x


def _clip(node, x, lo=None, hi=None):
    return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))


#: op_type -> function(node, *inputs); the only operators an ONNX graph may use here
OPS: dict[str, Callable[..., torch.Tensor]] = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda node, a, b: a @ b,
    "Add": lambda node, a, b: a + b,
    "Sub": lambda node, a, b: a - b,
    "Mul": lambda node, a, b: a * b,
    "Div": lambda node, a, b: a / b,
    "Relu": lambda node, x: torch.relu(x),
    "Sigmoid": lambda node, x: torch.sigmoid(x),
    "Clip": _clip,
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "GlobalAveragePool": lambda node, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": _reduce_mean,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Transpose": lambda node, x: x.permute(*[int(p) for p in node.attrs.get("perm", range(x.dim() - 1, -1, -1))]),
    "Concat": lambda node, *xs: torch.cat(xs, dim=int(node.attrs["axis"])),
    "Identity": lambda node, x: x,
}

_ONNX_INT = {2: torch.uint8, 3: torch.int8}  # TensorProto.UINT8, INT8


class _Node:
    __slots__ = ("op_type", "inputs", "outputs", "attrs", "fn", "zp_dtype")

    def __init__(self, proto, dtypes: dict[str, torch.dtype]) -> None:
        from onnx import helper

        if proto.domain not in ("", "ai.onnx"):
            raise CheckpointError(f"ONNX operator {proto.domain}.{proto.op_type} is not supported in torch")
        if proto.op_type not in OPS:
            raise CheckpointError(f"ONNX operator {proto.op_type!r} has no torch implementation here; "
                                  f"supported: {', '.join(sorted(OPS))}")
        self.op_type = proto.op_type
        self.fn = OPS[proto.op_type]
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}
        # the quantized integer type of QuantizeLinear's output comes from its zero point's dtype
        self.zp_dtype = {2: dtypes.get(self.inputs[2], torch.uint8)} if len(self.inputs) > 2 else {1: torch.uint8}


class OnnxGraphModule(nn.Module):
    """An ONNX model (bytes) executed with torch ops; constant DequantizeLinear nodes (int8
    weights) are folded at load. The stored weights are frozen parameters, so params/sparsity
    are measurable, in their stored dtypes."""

    def __init__(self, model_bytes: bytes) -> None:
        super().__init__()
        import onnx
        from onnx import numpy_helper

        model = onnx.load_from_string(model_bytes)
        graph = model.graph
        consts: dict[str, torch.Tensor] = {}
        dtypes: dict[str, torch.dtype] = {}
        for init in graph.initializer:
            arr = numpy_helper.to_array(init)
            consts[init.name] = torch.from_numpy(np.array(arr, copy=True))
            if init.data_type in _ONNX_INT:
                dtypes[init.name] = _ONNX_INT[init.data_type]
        nodes = []
        for proto in graph.node:
            if proto.op_type == "Constant":
                from onnx import helper

                value = helper.get_attribute_value(proto.attribute[0])
                consts[proto.output[0]] = torch.from_numpy(np.array(numpy_helper.to_array(value), copy=True))
                continue
            nodes.append(_Node(proto, dtypes))
        scales_or_zps = {n.inputs[i] for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                         for i in (1, 2) if i < len(n.inputs)}
        stored = [name for name, t in consts.items() if t.numel() > 1 and name not in scales_or_zps
                  and t.dtype in (torch.float32, torch.int8, torch.uint8, torch.int32)]
        self.stored = nn.ParameterList([nn.Parameter(consts[n], requires_grad=False) for n in stored])
        # fold nodes whose inputs are all constants (the weights' DequantizeLinear)
        self.nodes: list[_Node] = []
        with torch.no_grad():
            for node in nodes:
                if all(not i or i in consts for i in node.inputs):
                    consts[node.outputs[0]] = node.fn(node, *[consts[i] if i else None for i in node.inputs])
                else:
                    self.nodes.append(node)
        self.consts = consts
        self.input_name = graph.input[0].name
        self.output_name = graph.output[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = dict(self.consts)
        env[self.input_name] = x
        for node in self.nodes:
            args = [env[i] if i else None for i in node.inputs]
            while args and args[-1] is None:
                args.pop()
            env[node.outputs[0]] = node.fn(node, *args)
        return env[self.output_name]
