"""Shared pieces of the quantization / weight-sharing / low-rank methods.

- :func:`quantizable_layers`: the conv/linear layers a method acts on, by module name.
- :func:`swap_forward` / :func:`restore_forward`: give a layer a fake-quantized forward by
  swapping its class *in place* for a subclass (same object, same parameters and
  ``isinstance`` relations, so pruning callbacks and distillation hooks that hold the layer
  keep working; no new state-dict keys unless the method registers buffers).
- fake-quant helpers with a straight-through estimator
  (Bengio et al. 2013; Courbariaux et al., "BinaryConnect", NeurIPS 2015).
- :func:`hide_epoch_from_selection`: make the current epoch ineligible as the val-selected
  checkpoint (the artifact must come from epochs where the method was active).
- :func:`structure_of` / :func:`build_structure`: rebuild a student from its arch spec plus
  the low-rank factorization plan and the channel-pruned shapes, so every artifact format
  here composes with ``lowrank`` and ``prune=structured``.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Layer types whose weights the methods quantize / share / factorize.
QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def quantizable_layers(model: nn.Module, exclude: Sequence[str] = (), keep_first_last: bool = False,
                       types: tuple = QUANTIZABLE) -> dict[str, nn.Module]:
    """Conv/linear layers of ``model`` by name, in module order, minus ``exclude`` patterns
    (fnmatch) and, with ``keep_first_last``, the first and last such layer."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, types)}
    if keep_first_last and len(layers) > 2:
        names = list(layers)
        layers.pop(names[0])
        layers.pop(names[-1])
    return {n: m for n, m in layers.items() if not any(fnmatch.fnmatch(n, p) for p in exclude)}


def leaf_weight(module: nn.Module) -> torch.Tensor:
    """The trainable tensor behind ``module.weight`` (the original of a parametrization)."""
    params = getattr(module, "parametrizations", None)
    if params is not None and "weight" in params:
        return params.weight.original
    return module.weight


# ---- in-place forward swap -------------------------------------------------------------
_SWAPPED: dict[type, type] = {}


def _swapped_forward(self, x):
    hooks = self.__dict__["_cl_quant"]
    x = hooks.input(self, x) if hooks.input is not None else x
    weight = hooks.weight(self, self.weight) if hooks.weight is not None else self.weight
    if isinstance(self, nn.Linear):
        return F.linear(x, weight, self.bias)
    return self._conv_forward(x, weight, self.bias)


class SwapHooks:
    """Callables a swapped layer applies: ``weight(module, w) -> w'`` and ``input(module, x) -> x'``."""

    def __init__(self, weight: Callable | None = None, input: Callable | None = None) -> None:
        self.weight = weight
        self.input = input


def swap_forward(module: nn.Module, hooks: SwapHooks) -> None:
    """Route ``module``'s forward through ``hooks`` (in place; see the module docstring)."""
    base = module.__dict__.get("_cl_base", type(module))
    if base not in _SWAPPED:
        _SWAPPED[base] = type(f"FakeQuant{base.__name__}", (base,), {"forward": _swapped_forward})
    module.__dict__["_cl_base"] = base
    module.__dict__["_cl_quant"] = hooks
    module.__class__ = _SWAPPED[base]


def restore_forward(module: nn.Module) -> None:
    """Undo :func:`swap_forward`."""
    base = module.__dict__.pop("_cl_base", None)
    module.__dict__.pop("_cl_quant", None)
    if base is not None:
        module.__class__ = base


def is_swapped(module: nn.Module) -> bool:
    """Whether :func:`swap_forward` is active on ``module``."""
    return "_cl_quant" in module.__dict__


# ---- straight-through estimators -------------------------------------------------------
class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax):
        q = torch.round(x / scale) + zero
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return (torch.clamp(q, qmin, qmax) - zero) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quant_ste(x: torch.Tensor, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero, qmin, qmax) - zero) * scale`` with the clipped straight-through
    gradient of torch's ``FakeQuantize``: ``dL/dx = dL/dy`` where ``qmin <= round(x/scale) + zero <= qmax``
    (inclusive), 0 elsewhere. ``scale`` / ``zero`` are constants (tensors broadcastable to x, or floats)."""
    if isinstance(scale, torch.Tensor):
        scale = scale.detach()
    if isinstance(zero, torch.Tensor):
        zero = zero.detach()
    return _FakeQuantSTE.apply(x, scale, zero, qmin, qmax)


def ste(value: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, gradient passed unchanged to ``value`` (STE)."""
    return value + (quantized - value).detach()


def fake_quant_affine(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Per-tensor asymmetric uniform fake quantization of ``x`` to ``bits`` bits on [lo, hi]
    (zero exactly representable), STE inside the range and zero gradient outside it."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = (1 << int(bits)) - 1
    scale = max((hi - lo) / levels, 1e-8)
    zero = round(-lo / scale)
    return fake_quant_ste(x, scale, zero, 0, levels)


# ---- checkpoint selection --------------------------------------------------------------
def hide_epoch_from_selection(trainer) -> None:
    """Make the current epoch ineligible as the val-selected checkpoint.

    Call from a callback's ``on_train_epoch_end`` (before Lightning's checkpoint callbacks,
    which always run last): the monitored value in ``trainer.callback_metrics`` becomes the
    worst possible value for the callback's mode (the logged metric is unchanged).
    """
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        key = getattr(cb, "monitor", None)
        if key and key in trainer.callback_metrics:
            ref = trainer.callback_metrics[key]
            worst = math.inf if getattr(cb, "mode", "max") == "min" else -math.inf
            trainer.callback_metrics[key] = torch.tensor(worst, dtype=torch.float32,
                                                         device=getattr(ref, "device", "cpu"))


# ---- structure (arch spec + low-rank plan) ---------------------------------------------
def structure_of(model: nn.Module, context: Mapping[str, Any]) -> dict[str, Any]:
    """Plain-data description of the structural changes made to a zoo model: the low-rank
    plan, and the shapes of the tensors that channel pruning resized (only those that differ
    from the model rebuilt from ``context``'s arch spec and that plan)."""
    from compresslab.compress.lowrank import lowrank_plan

    plan = lowrank_plan(model)
    structure: dict[str, Any] = {"lowrank": plan} if plan else {}
    fresh = build_structure(context["arch"], context["input_shape"], context["num_classes"], structure)
    fresh_shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    resized = {k: [int(d) for d in v.shape] for k, v in model.state_dict().items()
               if k in fresh_shapes and tuple(v.shape) != fresh_shapes[k]}
    if resized:
        structure["resized"] = resized
    return structure


def build_structure(arch: Mapping[str, Any], input_shape: Sequence[int], num_classes: int,
                    structure: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the zoo model from ``arch`` and re-apply a :func:`structure_of` description
    (low-rank factorization, then the channel-pruned tensor shapes)."""
    from compresslab.models import build_model

    model = build_model(arch, input_shape, num_classes)
    if structure and structure.get("lowrank"):
        from compresslab.compress.lowrank import apply_plan

        apply_plan(model, structure["lowrank"])
    if structure and structure.get("resized"):
        from compresslab.compress.pruning.structured import resize_to_state_dict

        shapes = {k: torch.empty([int(d) for d in shape], device="meta") for k, shape in structure["resized"].items()}
        for name in resize_to_state_dict(model, shapes):  # defined values until the saved ones are loaded
            module = model.get_submodule(name)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copy of the state dict, with swapped layers' extra buffers included as they are."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
