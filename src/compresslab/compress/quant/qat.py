"""Quantization-aware training as a Lightning callback (``quant=qat_int8``).

Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-
Only Inference" (CVPR 2018); Krishnamoorthi, arXiv:1806.08342 (2018), Sec. 3-4: the forward
pass simulates int8 inference (fake quantization) while gradients update fp32 weights through
a straight-through estimator (clipped like torch's ``FakeQuantize``: zero gradient where the
rounded value was clamped to the int8 range); late in training the activation observers and the batch-norm
statistics are frozen. Lightning 2.x ships no QAT callback; :class:`QATCallback` is ours.

What is simulated, per conv/linear layer of the student:

- weights: per-output-channel symmetric int8, ``scale = max|W_c| / 127.5``, exactly the
  x86 quantizer's ``PerChannelMinMaxObserver``. Fake-quantizing the unfolded weight is
  exactly equivalent to fake-quantizing the BN-folded weight the int8 artifact stores,
  because per-channel symmetric quantization commutes with the per-channel BN scale.
- activations entering the layer: per-tensor uint8 affine on an exponential moving average
  of the observed min/max (averaging constant ``act_momentum``, default 0.01 as in
  ``FusedMovingAvgObsFakeQuantize``).

Schedule (epochs; negative values count from the end): fake quantization is *switched on*
at ``start_epoch`` (the fake-quant state is attached before the fit, so checkpoint keys never
change and a resumed run continues), observers freeze at ``freeze_observer_epoch``, BN
statistics freeze (BN layers run in eval mode) at ``freeze_bn_epoch``. Only epochs with the whole
schedule in place (from the latest of the three epochs on, reported as ``qat_select_from_epoch``)
are eligible as the val-selected checkpoint: the artifact comes from the converged QAT model.

The layers are patched in place (see :func:`~compresslab.compress.quant.swap.swap_forward`),
so pruning callbacks and distillation hooks keep working: ``distill=kd prune=agp quant=qat_int8``
composes. At the end the fake-quant state is removed and the trained fp32 student goes through
the same PT2E conversion as ``ptq_int8`` (activation ranges calibrated on training batches),
giving the same int8 artifact type.
"""

from __future__ import annotations

import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.common import (
    fake_quant_affine,
    fake_quant_ste,
    hide_epoch_from_selection,
    resolve_epoch,
    select_layers,
)
from compresslab.compress.quant.ptq import PT2EInt8
from compresslab.compress.quant.swap import SwapHooks, strip_swaps, swap_forward
from compresslab.compress.quant.options import QATOptions
from compresslab.errors import ConfigError

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_RANGE = "qat_act_range"


def fake_quant_weight_int8(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 fake quantization with a straight-through gradient."""
    flat = w.reshape(w.shape[0], -1)
    scale = (flat.detach().abs().amax(1, keepdim=True) / 127.5).clamp_min(2 ** -12)
    return fake_quant_ste(flat, scale, 0, -128, 127).reshape(w.shape)


class _QATState:
    def __init__(self, method: "QATInt8") -> None:
        self.method = method

    def weight(self, module: nn.Module, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight_int8(w) if self.method.fake_quant else w

    def input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        m = self.method
        if not m.fake_quant or not m.quantize_activations:
            return x
        rng = getattr(module, _RANGE)
        if module.training and m.observe:
            with torch.no_grad():
                lo, hi = x.detach().min(), x.detach().max()
                if rng[2] == 0:
                    rng.copy_(torch.stack([lo, hi, torch.ones_like(lo)]))
                else:
                    rng[0].add_(m.act_momentum * (lo - rng[0]))
                    rng[1].add_(m.act_momentum * (hi - rng[1]))
        if rng[2] == 0:
            return x
        return fake_quant_affine(x, float(rng[0]), float(rng[1]), 8)


class QATInt8(PT2EInt8):
    """``quant=qat_int8``: fake-quantized training, then the PTQ int8 artifact."""

    mode = "static"

    options = QATOptions

    def __init__(self, name: str, start_epoch: int = 0, freeze_observer_epoch: int | None = -2,
                 freeze_bn_epoch: int | None = -2, act_momentum: float = 0.01, quantize_activations: bool = True,
                 num_calibration_batches: int = 16, calibration_split: str = "train", lower: bool = True) -> None:
        super().__init__(name, num_calibration_batches, calibration_split, lower)
        self.start_epoch = int(start_epoch)
        self.freeze_observer_epoch = None if freeze_observer_epoch is None else int(freeze_observer_epoch)
        self.freeze_bn_epoch = None if freeze_bn_epoch is None else int(freeze_bn_epoch)
        self.act_momentum = float(act_momentum)
        self.quantize_activations = bool(quantize_activations)
        self.fake_quant = False
        self.observe = True
        self.freeze_bn = False
        self.eligible = True
        self.layer_names: list[str] = []
        self.schedule: dict[str, int | None] = {}

    def resolve(self, epoch: int | None, max_epochs: int) -> int | None:
        """Epoch setting -> absolute epoch (negative counts from the end)."""
        return None if epoch is None else resolve_epoch(epoch, max_epochs)

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        """Switch fake quantization / observers / BN freezing for ``epoch``."""
        start = self.resolve(self.start_epoch, max_epochs)
        obs = self.resolve(self.freeze_observer_epoch, max_epochs)
        bn = self.resolve(self.freeze_bn_epoch, max_epochs)
        select = max(e for e in (start, obs, bn) if e is not None)
        self.schedule = {"qat_start_epoch": start, "qat_freeze_observer_epoch": obs, "qat_freeze_bn_epoch": bn,
                         "qat_select_from_epoch": select}
        self.fake_quant = epoch >= start
        self.observe = obs is None or epoch < obs
        self.freeze_bn = bn is not None and epoch >= bn
        self.eligible = epoch >= select

    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        layers = select_layers(student)
        if not layers:
            raise ConfigError(f"quant={self.name}: the student has no conv/linear layer to quantize")
        self.layer_names = list(layers)
        for module in layers.values():
            module.register_buffer(_RANGE, torch.zeros(3))
            swap_forward(module, SwapHooks(weight=_QATState(self).weight, input=_QATState(self).input))
        return student

    def callbacks(self) -> list[Callback]:
        return [QATCallback(self)]

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        self._report["qat_act_ranges_observed"] = sum(
            int(getattr(m, _RANGE)[2] > 0) for m in student.modules() if _RANGE in m._buffers)
        strip_qat(student)
        self._report.update(self.schedule)
        return super().finalize(student, datamodule)


def strip_qat(student: nn.Module) -> nn.Module:
    """Remove the fake-quant forward and its buffers: the plain fp32 student is left."""
    return strip_swaps(student, buffers=(_RANGE,))


class QATCallback(Callback):
    """Drives :class:`QATInt8`'s schedule during the student fit."""

    def __init__(self, method: QATInt8) -> None:
        self.method = method

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.method.set_epoch(trainer.current_epoch, trainer.max_epochs)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.method.freeze_bn:
            for m in pl_module.model.modules():
                if isinstance(m, _BN):
                    m.eval()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.method.eligible:
            hide_epoch_from_selection(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.method.fake_quant = True  # the test after fit evaluates the quantization-aware model
