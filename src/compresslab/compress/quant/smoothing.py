"""Per-input-channel smoothing shared by AWQ and SmoothQuant: the identity
``X·Wᵀ = (X·diag(s)^-1)·(W·diag(s))ᵀ`` for a group of Linears reading the same input ``X``, and
folding ``diag(s)^-1`` into the module that produced ``X`` where that is exact.

Generic, without naming an architecture: the producer is the module whose forward *output is the
very tensor* the group reads (found with hooks on one calibration batch). It is folded into when it
is a norm with a per-channel affine weight (``nn.LayerNorm``, ``nn.RMSNorm``, or a module whose
class name ends in ``RMSNorm`` with a 1-D weight, e.g. Hugging Face's ``LlamaRMSNorm``:
weight and bias divided by ``s``) or an ``nn.Linear`` (its output rows and bias divided by ``s``),
and only if the model's output on that batch is unchanged afterwards (another reader of the same
tensor would change it; then the fold is undone). Otherwise ``1/s`` stays an explicit per-channel
multiply of the group's input at run time (:class:`~compresslab.compress.codecs.packed_int.InputScale`,
stored as ``input_scale``). In a Llama block the q/k/v and gate/up inputs fold into the two RMSNorms;
o_proj and down_proj keep the run-time scale.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from compresslab.compress.calibration import StopForward


def _is_norm(module: nn.Module, width: int) -> bool:
    w = getattr(module, "weight", None)
    named_rms = type(module).__name__.endswith("RMSNorm")
    return (isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or named_rms) and isinstance(w, torch.Tensor) \
        and w.dim() == 1 and w.numel() == width


def producer_of(model: nn.Module, reader: str, example: torch.Tensor) -> str | None:
    """Name of the module whose output is the tensor Linear ``reader`` reads (None if no module's)."""
    outputs: list[tuple[str, torch.Tensor]] = []
    found: list[str | None] = []
    handles = []
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: outputs.append((name, out)) if isinstance(out, torch.Tensor) else None))
    target = model.get_submodule(reader)

    def pre(mod, args):
        found.append(next((n for n, t in outputs if t is args[0]), None))
        raise StopForward

    handles.append(target.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(example)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _scale_producer(module: nn.Module, factor: torch.Tensor) -> None:
    """Multiply the producer's output channels by ``factor``."""
    if isinstance(module, nn.Linear):
        module.weight.data.mul_(factor.unsqueeze(1).to(module.weight.dtype))
    else:
        module.weight.data.mul_(factor.to(module.weight.dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data.mul_(factor.to(bias.dtype))


def fold_smoothing(model: nn.Module, group: Sequence[str], s: torch.Tensor, example: torch.Tensor,
                   rtol: float = 1e-4) -> str | None:
    """Scale the group's weight columns by ``s`` and fold ``1/s`` into the producer of its input
    when exact (see the module doc). Returns the producer folded into, or None: then the caller
    must divide the group's input by ``s`` at run time (its weights are scaled either way)."""
    width = model.get_submodule(group[0]).in_features
    s = s.to(torch.float32)
    name = producer_of(model, group[0], example)
    producer = model.get_submodule(name) if name else None
    if producer is not None and not (_is_norm(producer, width) or
                                     (isinstance(producer, nn.Linear) and producer.out_features == width)):
        producer = None
    if producer is not None and type(producer.weight.detach()) is not torch.Tensor:
        producer = None  # already quantized by an earlier group (a torchao tensor): its codes stay as they are
    for layer in group:
        model.get_submodule(layer).weight.data.mul_(s.unsqueeze(0))
    if producer is None:
        return None
    with torch.no_grad():
        _scale_group(model, group, 1 / s)
        before = _logits(model(example))
        _scale_group(model, group, s)
        _scale_producer(producer, 1 / s)
        after = _logits(model(example))
    if torch.allclose(after, before, rtol=rtol, atol=rtol * float(before.abs().max())):
        return name
    _scale_producer(producer, s)
    return None


def _scale_group(model: nn.Module, group: Sequence[str], factor: torch.Tensor) -> None:
    for layer in group:
        model.get_submodule(layer).weight.data.mul_(factor.unsqueeze(0))


def _logits(out) -> torch.Tensor:
    """The main tensor of a model output (a Hugging Face output's ``logits``, else the tensor)."""
    return getattr(out, "logits", out) if not isinstance(out, torch.Tensor) else out
