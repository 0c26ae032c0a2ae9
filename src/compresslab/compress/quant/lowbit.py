"""Low-bit weight quantization trained with a straight-through estimator, saved bit-packed.

Schemes (``bits``):

- ``8, 4, 3, 2`` — uniform symmetric per-channel (or per-layer) quantization,
  ``q in [-2^(b-1), 2^(b-1)-1]``, ``w ~ s * q``. The scale of each channel is the
  one of a small grid of clipping ratios that minimises the squared quantization error
  (a per-step MSE search, as in the clipping analysis of Banner et al., NeurIPS 2019).
- ``ternary`` — Ternary Weight Networks (Li, Zhang & Liu, arXiv:1605.04711, 2016):
  threshold ``Delta = 0.7 * mean|W|``, ``alpha = mean(|W| where |W| > Delta)``,
  ``w ~ alpha * {-1, 0, +1}``; stored five weights per byte (base 3).
- ``binary`` — scaled sign (BinaryConnect, Courbariaux et al. NeurIPS 2015, with
  XNOR-Net's per-filter scale, Rastegari et al. ECCV 2016): ``w ~ alpha * sign(W)``,
  ``alpha = mean|W|``; one bit per weight.

During training each selected layer computes with its quantized weight; gradients reach
the latent fp32 weight unchanged (straight-through estimator, Bengio et al. 2013).
Activations entering the quantized layers can be fake-quantized too (``act_bits``,
per-tensor asymmetric on an EMA of the observed range). Compute is *simulated*: the
artifact (:mod:`compresslab.compress.codecs.lowbit`) stores packed codes + scales, and its
loader rebuilds a working model with the dequantized weights (fp32 kernels). The quantizer
formulas are :mod:`compresslab.compress.quant.quantizers`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.codecs.bitpack import dtype_from_name
from compresslab.compress.codecs.lowbit import encode_lowbit
from compresslab.compress.common import fake_quant_affine, hide_epoch_from_selection, select_layers, ste
from compresslab.compress.quant.options import LowBitOptions
from compresslab.compress.quant.quantizers import parse_bits, quantize_weight
from compresslab.compress.quant.swap import SwapHooks, strip_swaps, swap_forward
from compresslab.errors import ConfigError


class _LowBitState:
    """What the swapped forward of one layer needs (kept outside the state dict)."""

    def __init__(self, method: "LowBit") -> None:
        self.method = method
        self.act_range: torch.Tensor | None = None  # [lo, hi, initialised]

    def weight(self, module: nn.Module, w: torch.Tensor) -> torch.Tensor:
        m = self.method
        if not m.active:
            return w
        _, _, deq = quantize_weight(w, m.scheme, m.bits, m.per_channel, m.scale_dtype)
        return ste(w, deq.to(w.dtype))

    def input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        m = self.method
        if m.act_bits is None or not m.active:
            return x
        rng = module.lowbit_act_range
        if module.training:
            with torch.no_grad():
                lo, hi = x.detach().min(), x.detach().max()
                if rng[2] == 0:
                    rng.copy_(torch.stack([lo, hi, torch.ones_like(lo)]))
                else:
                    mom = m.act_momentum
                    rng[0].mul_(1 - mom).add_(mom * lo)
                    rng[1].mul_(1 - mom).add_(mom * hi)
        if rng[2] == 0:
            return x
        return fake_quant_affine(x, float(rng[0]), float(rng[1]), m.act_bits)


class LowBitCallback(Callback):
    """Turns the low-bit forward on from ``start_epoch``; earlier epochs are not eligible
    as the val-selected checkpoint."""

    def __init__(self, method: "LowBit") -> None:
        self.method = method

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.method.active = trainer.current_epoch >= self.method.start_epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.method.start_epoch:
            hide_epoch_from_selection(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.method.active = trainer.current_epoch >= self.method.start_epoch


class LowBit(CompressionMethod):
    """Low-bit (8/4/3/2-bit uniform, ternary, binary) weights with STE training; bit-packed artifact."""

    options = LowBitOptions

    def __init__(self, name: str, bits: Any = 4, per_channel: bool = True, scale_dtype: str = "float16",
                 act_bits: int | None = None, act_momentum: float = 0.1, keep_first_last: bool = False,
                 exclude: Sequence[str] = (), start_epoch: int = 0) -> None:
        super().__init__(name)
        self.scheme, self.bits = parse_bits(bits)
        self.per_channel = bool(per_channel)
        self.scale_dtype = dtype_from_name(scale_dtype)
        self.act_bits = None if act_bits is None else int(act_bits)
        self.act_momentum = float(act_momentum)
        self.keep_first_last = bool(keep_first_last)
        self.exclude = list(exclude)
        self.start_epoch = int(start_epoch)
        self.active = self.start_epoch <= 0
        self.layer_names: list[str] = []
        self._report: dict[str, Any] = {}

    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        layers = select_layers(student, self.exclude, keep_first_last=self.keep_first_last)
        if not layers:
            raise ConfigError(f"quant={self.name}: the student has no conv/linear layer to quantize")
        self.layer_names = list(layers)
        for module in layers.values():
            state = _LowBitState(self)
            if self.act_bits is not None:
                module.register_buffer("lowbit_act_range", torch.zeros(3))
            swap_forward(module, SwapHooks(weight=state.weight, input=state.input))
        return student

    def callbacks(self) -> list[Callback]:
        return [LowBitCallback(self)]

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        self.active = True
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict:
        # re-resolved on the final student (a low-rank method may have replaced layers since prepare)
        names = list(select_layers(student, self.exclude, keep_first_last=self.keep_first_last))
        payload, stats = encode_lowbit(student, names, self.scheme, self.bits, self.per_channel,
                                       self.scale_dtype, self.act_bits, context)
        self._report = stats
        return payload

    def report(self) -> dict[str, Any]:
        return dict(self._report)


def strip_lowbit(student: nn.Module) -> nn.Module:
    """Return the student's layers to their plain forward (drops the activation-range buffers)."""
    return strip_swaps(student, buffers=("lowbit_act_range",))
