"""Pieces every compression method shares.

- :func:`select_layers`: the conv/linear layers a method acts on, by module name (one selector
  for every method: layer types, ``exclude`` name patterns, the classifier, the first and last
  layer), and :func:`classifier_name`, :func:`matches`.
- straight-through estimators for fake quantization (Bengio et al. 2013; Courbariaux et al.,
  "BinaryConnect", NeurIPS 2015): :func:`fake_quant_ste`, :func:`ste`, :func:`fake_quant_affine`.
- :func:`hide_epoch_from_selection`: make the current epoch ineligible as the val-selected
  checkpoint (the artifact must come from epochs where the method was active).
- small module helpers: :func:`leaf_weight`, :func:`set_module`, :func:`dense_state`,
  :func:`resolve_epoch`.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from compresslab.errors import ConfigError

#: Every conv (1-3-d, transposed too) and linear layer: the layers pruning acts on.
CONV_LINEAR = (nn.Linear, _ConvNd)
#: Layer types whose weights the quantization / weight-sharing / low-rank methods act on.
QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


# ---- layer selection ---------------------------------------------------------------------
def matches(name: str, patterns: Iterable[str], case_sensitive: bool = True) -> bool:
    """Whether module ``name`` matches one of the ``fnmatch`` ``patterns`` (``"conv1"``, ``"layer1.*"``);
    ``case_sensitive=False`` is :func:`fnmatch.fnmatch` (the platform's file-name case rule)."""
    match = fnmatch.fnmatchcase if case_sensitive else fnmatch.fnmatch
    return any(match(name, p) for p in patterns)


def classifier_name(model: nn.Module, types: tuple = CONV_LINEAR) -> str | None:
    """Name of the output layer: the last ``nn.Linear`` registered (else the last layer of ``types``)."""
    last_linear = last_any = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_linear = name
        if isinstance(module, types):
            last_any = name
    return last_linear if last_linear is not None else last_any


def select_layers(model: nn.Module, exclude: Sequence[str] = (), *, types: tuple = QUANTIZABLE,
                  keep_first_last: bool = False, include_classifier: bool = True,
                  case_sensitive: bool = False) -> dict[str, nn.Module]:
    """The layers of ``model`` a method acts on, by name, in module order.

    ``types``: the layer types (:data:`QUANTIZABLE`; pruning: :data:`CONV_LINEAR`).
    ``exclude``: module-name patterns left out (see :func:`matches`). ``keep_first_last``: the
    first and last layer of ``types`` are left out too (when there are more than two).
    ``include_classifier=False`` leaves out :func:`classifier_name`'s layer. A model with an
    ``nn.MultiheadAttention`` is refused (its weights are not read through its Linears).
    """
    mha = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if mha:
        raise ConfigError(f"the model's nn.MultiheadAttention {mha} reads in_proj_weight and out_proj.weight "
                          "directly, so no method working on Linear layers reaches them; convert it first with "
                          "compresslab.models.attention.explicit_attention(model) (build_model does it).")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, types)}
    if keep_first_last and len(layers) > 2:
        names = list(layers)
        layers.pop(names[0])
        layers.pop(names[-1])
    head = None if include_classifier else classifier_name(model, types)
    return {n: m for n, m in layers.items() if n != head and not matches(n, exclude, case_sensitive)}


def leaf_weight(module: nn.Module) -> torch.Tensor:
    """The trainable tensor behind ``module.weight`` (the original of a parametrization)."""
    params = getattr(module, "parametrizations", None)
    if params is not None and "weight" in params:
        return params.weight.original
    return module.weight


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (a dotted path) of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def dense_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a state dict's tensors."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def resolve_epoch(epoch: int, max_epochs: int) -> int:
    """An epoch setting as an absolute epoch: negative values count from the end of the fit."""
    return epoch if epoch >= 0 else max(0, int(max_epochs) + epoch)


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
    worst possible value for the callback's mode (the logged metric is unchanged), so the
    best checkpoint is chosen among the epochs where the method's schedule was complete.
    """
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        key = getattr(cb, "monitor", None)
        if key and key in trainer.callback_metrics:
            ref = trainer.callback_metrics[key]
            worst = math.inf if getattr(cb, "mode", "max") == "min" else -math.inf
            trainer.callback_metrics[key] = torch.tensor(worst, dtype=torch.float32,
                                                         device=getattr(ref, "device", "cpu"))
