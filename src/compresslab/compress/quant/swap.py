"""Give a conv/linear layer a fake-quantized forward by swapping its class *in place*.

:func:`swap_forward` replaces the layer's class by a subclass whose forward routes the weight and
the input through :class:`SwapHooks`: the same object, the same parameters and ``isinstance``
relations, so pruning callbacks and distillation hooks that hold the layer keep working, and no
new state-dict keys appear unless the method registers buffers. :func:`restore_forward` undoes it.
Used by the QAT, low-bit and LSQ/PACT methods during training and by their artifacts' loaders.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch.nn.functional as F
from torch import nn

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


def strip_swaps(model: nn.Module, buffers: Sequence[str] = (), parameters: Sequence[str] = ()) -> nn.Module:
    """:func:`restore_forward` on every module of ``model``, and drop the ``buffers`` / ``parameters``
    (by attribute name) that the method registered on its layers; returns ``model``."""
    for module in model.modules():
        restore_forward(module)
        for key in buffers:
            module._buffers.pop(key, None)
        for key in parameters:
            module._parameters.pop(key, None)
    return model


def is_swapped(module: nn.Module) -> bool:
    """Whether :func:`swap_forward` is active on ``module``."""
    return "_cl_quant" in module.__dict__
