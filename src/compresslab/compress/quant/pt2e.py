"""Int8 quantization through PyTorch 2 export (PT2E) with torchao's x86 quantizer, lowered to
oneDNN int8 kernels.

Flow (what PyTorch recommends since ``torch.ao.quantization`` was deprecated):
``torch.export`` (strict, batch dimension dynamic) -> ``prepare_pt2e`` with
``X86InductorQuantizer`` (conv+BN folded; weights int8 per-channel symmetric, activations
uint8 per-tensor affine, static with observers calibrated on training batches, or dynamic
for Linear layers) -> calibration -> ``convert_pt2e`` (a reference graph of
quantize/dequantize ops around fp32 ops, with int8 weight constants) -> x86 lowering
(:func:`lower_x86`: torchao's ``lower_pt2e_quantized_to_x86``, whose freezing passes rewrite
the q/dq patterns into ``onednn.qconv_pointwise`` / ``qlinear_pointwise`` calls on prepacked
int8 weights), which runs real int8 compute in eager mode without code generation. Only
public torch/torchao APIs are used.

The artifact format (``compresslab.int8_pt2e/1``: plain data, no serialized graph) and its
loader, which runs this same deterministic flow on a freshly built model and installs the
saved constants, are :mod:`compresslab.compress.codecs.int8`.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Iterable, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("static", "dynamic")
_MAX_BATCH = 1 << 16


def _torchao():
    """Import the torchao PT2E pieces (and register the x86 lowering patterns)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )
    import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401  (registers qconv/qlinear patterns)

    return prepare_pt2e, convert_pt2e, X86InductorQuantizer, get_default_x86_inductor_quantization_config


def _q_ops() -> tuple:
    qd = torch.ops.quantized_decomposed
    return (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default)


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=_MAX_BATCH)


def example_input(input_shape: Sequence[int]) -> torch.Tensor:
    """A zero batch of two inputs of ``input_shape`` (what export and lowering trace with)."""
    return torch.zeros(2, *[int(v) for v in input_shape])


def _unique_module_stacks(gm: torch.fx.GraphModule) -> None:
    """Give every call of a shared module (e.g. one ``nn.ReLU`` used twice in a block) its own
    source partition. Non-strict export leaves ``source_fn_stack`` empty and the quantizer then
    groups partitions by module name, which fails for modules called more than once."""
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key = list(stack)[-1]
        fqn, cls = stack[key]
        n = seen.get(fqn, 0)
        seen[fqn] = n + 1
        if n:
            stack = dict(stack)
            stack[key] = (f"{fqn}@{n}", cls)
            node.meta["nn_module_stack"] = stack


def capture(model: nn.Module, example: torch.Tensor) -> tuple[torch.fx.GraphModule, str]:
    """``torch.export`` with a dynamic batch dimension. Non-strict tracing (torch.export's default,
    ~3x faster to trace here) with :func:`_unique_module_stacks`, which gives the same quantized
    graph as strict (dynamo) tracing; strict is the fallback. Returns (graph module, how)."""
    dyn = ({0: _batch_dim()},)
    try:
        gm = torch.export.export(model, (example,), dynamic_shapes=dyn, strict=False).module()
        _unique_module_stacks(gm)
        return gm, "non_strict"
    except Exception as exc:  # noqa: BLE001 - report and try the other tracer
        log.warning("non-strict torch.export failed (%s); trying strict export", exc)
        return torch.export.export(model, (example,), dynamic_shapes=dyn, strict=True).module(), "strict"


def quantizer_for(mode: str):
    """torchao's X86InductorQuantizer with the default static or dynamic int8 config."""
    _, _, X86InductorQuantizer, default_config = _torchao()
    return X86InductorQuantizer().set_global(default_config(is_dynamic=(mode == "dynamic")))


@torch.no_grad()
def quantize_pt2e(model: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor],
                  mode: str = "static") -> tuple[torch.fx.GraphModule, dict]:
    """Export, prepare, calibrate and convert ``model`` (not modified). Returns the converted
    reference graph and facts about the run (capture mode, calibration batches, time)."""
    prepare_pt2e, convert_pt2e, _, _ = _torchao()
    start = time.perf_counter()
    model = copy.deepcopy(model).cpu().eval()  # int8 inference is a CPU (oneDNN) artifact
    gm, how = capture(model, example)
    prepared = prepare_pt2e(gm, quantizer_for(mode))
    n = 0
    for x in calibration:
        prepared(x.cpu())
        n += 1
    if n == 0:
        prepared(example)
    converted = convert_pt2e(prepared)
    _drop_unused_attributes(converted)
    return converted, {"capture": how, "calibration_batches": n, "convert_time_s": time.perf_counter() - start}


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """Remove parameters/buffers the converted graph no longer reads (the fp32 weights that
    were folded into int8 constants)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k in gm.state_dict() if k not in used]:
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        for store in (owner._parameters, owner._buffers):
            store.pop(attr, None)
        owner.__dict__.pop(attr, None)


def graph_constants(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors the converted graph reads (``get_attr`` targets), by name, in graph order."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in out:
            value = _get_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                out[node.target] = value.detach().cpu().clone()
    return out


def qparam_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The per-tensor quantize/dequantize nodes whose scale and zero point are literals, in order."""
    ops = _q_ops()
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target in ops and not isinstance(n.args[1], torch.fx.Node)]


def graph_qparams(gm: torch.fx.GraphModule) -> list[list]:
    """``[scale, zero_point]`` literals of every per-tensor quantize/dequantize node, in order."""
    return [[float(n.args[1]), int(n.args[2])] for n in qparam_nodes(gm)]


def _get_attr(gm: nn.Module, target: str):
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    return getattr(owner, attr)


# The strict ``torch.export`` inside torchao's lowering traces the module's inputs under this
# source name; marking its dim 0 dynamic keeps the batch symbolic (``torch.compiler.config`` is
# public, the name is what torch.export's strict tracer calls its flattened positional inputs).
_BATCH_SOURCE = r"L\['flat_args'\]\[0\]$:0"


def lower_x86(converted: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    """Lower a converted PT2E graph to oneDNN int8 ops with torchao's public
    ``lower_pt2e_quantized_to_x86`` (inductor's freezing passes rewrite the q/dq patterns into
    ``onednn.qconv_pointwise`` / ``qlinear_pointwise`` on prepacked int8 weights).

    torchao exports with no ``dynamic_shapes``; ``torch.compiler.config.dynamic_sources`` marks
    the input's batch dimension dynamic for that export, so the lowered graph reads the batch
    size at run time (``sym_size``) instead of baking in the example's. Two fixes on the result:
    ``view`` becomes ``reshape`` (oneDNN outputs can be channels-last), and the graph is
    re-wrapped in a plain ``GraphModule``, dropping the unlifted module's input check, which
    the freezing passes' shape propagation pinned to the example's batch size. A graph that
    still fails at batch 1 raises (the caller falls back to the reference graph)."""
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    _torchao()
    with torch.no_grad(), torch.compiler.config.patch(dynamic_sources=_BATCH_SOURCE):
        lowered = lower_pt2e_quantized_to_x86(converted, (example,))
    for node in lowered.graph.nodes:
        if node.target == torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    lowered = torch.fx.GraphModule(lowered, lowered.graph)
    try:
        with torch.no_grad():
            lowered(example[:1])
    except RuntimeError as exc:
        raise RuntimeError(f"the x86 lowering specialized the batch dimension to {example.shape[0]} "
                           f"(batch 1 fails: {exc})") from exc
    return lowered


def int8_ops(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the oneDNN int8 ops a lowered graph calls (empty: no real int8 compute)."""
    return sorted({str(n.target) for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("onednn.q")})


# ---- MACs of oneDNN int8 ops (FlopCounterMode counts FLOPs = 2 x MACs) ----------------------
_FLOPS_REGISTERED = False


def register_flop_formulas() -> None:
    """Teach ``FlopCounterMode`` the oneDNN int8 conv/linear ops (once per process)."""
    global _FLOPS_REGISTERED
    if _FLOPS_REGISTERED:
        return
    _FLOPS_REGISTERED = True
    from torch.utils.flop_counter import register_flop_formula

    _torchao()
    onednn = torch.ops.onednn

    def conv_flops(qx, x_scale, x_zp, qw, w_scale, w_zp, *args, out_val=None, **kwargs) -> int:
        # qconv_pointwise: bias, stride, padding, dilation, groups, ...
        # qconv2d_pointwise.binary: qaccum, bias, stride, padding, dilation, groups, ...
        groups = args[4] if isinstance(args[1], (list, tuple)) else args[5]
        per_out = qx.shape[1] // max(1, int(groups))
        return 2 * out_val.numel() * per_out * _kernel_numel(qw, out_val.shape[1], per_out)

    def linear_flops(qx, x_scale, x_zp, qw, *args, out_val=None, **kwargs) -> int:
        return 2 * out_val.numel() * qx.shape[-1]

    try:
        register_flop_formula([onednn.qconv_pointwise, onednn.qconv2d_pointwise], get_raw=True)(conv_flops)
        register_flop_formula([onednn.qlinear_pointwise], get_raw=True)(linear_flops)
    except Exception as exc:  # noqa: BLE001 - MACs are informative; never break loading over them
        log.warning("could not register FLOP formulas for oneDNN int8 ops: %s", exc)


def _kernel_numel(qw, out_channels: int, in_per_group: int) -> int:
    """Spatial kernel size from a (possibly prepacked) weight's element count."""
    try:
        return max(1, int(qw.numel()) // max(1, out_channels * in_per_group))
    except Exception:  # noqa: BLE001 - opaque prepacked tensor
        return 1
