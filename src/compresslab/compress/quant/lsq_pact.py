"""Low-bit QAT of weights *and* activations: LSQ and PACT, saved bit-packed.

- ``quant=lsq`` — Learned Step Size Quantization (Esser et al., "Learned Step Size
  Quantization", ICLR 2020). Weights and the activations entering each quantized layer are
  quantized as ``v̂ = round(clip(v/s, −Q_N, Q_P)) · s`` with one learned step size ``s`` per
  layer and tensor. Weights are signed (``Q_N = 2^(b−1)``, ``Q_P = 2^(b−1) − 1``); activations
  are unsigned (``Q_N = 0``, ``Q_P = 2^b − 1``) when the layer's input is non-negative at
  initialisation (post-ReLU), signed otherwise. The straight-through estimator passes the
  rounding; the step-size gradient is the paper's Eq. 3 (``−v/s + round(v/s)`` inside the range,
  ``−Q_N`` / ``Q_P`` outside), scaled by ``g = 1/sqrt(N · Q_P)`` with ``N`` the layer's number of
  weights or of input features per sample. Initialisation ``s = 2⟨|v|⟩/sqrt(Q_P)`` (weights: the
  layer's weights; activations: the first training batch). The first and last layers are kept
  at 8 bits (the paper's setting; ``first_last_bits``).
- ``quant=pact`` — PACT (Choi et al., "PACT: Parameterized Clipping Activation for Quantized
  Neural Networks", arXiv:1805.06085, 2018). Activations: ``y = 0.5(|x| − |x − α| + α)`` (= clip to
  ``[0, α]``) with a learned ``α`` per layer, then ``y_q = round(y · (2^b − 1)/α) · α/(2^b − 1)``;
  ``∂y_q/∂α = 1`` where ``x ≥ α`` and 0 elsewhere (the paper's Eq. 3, STE through the rounding),
  ``α`` initialised to 10 and L2-regularised with ``alpha_decay`` (the paper's λ_α). Weights use
  DoReFa's scheme, as the paper does (Zhou et al. 2016): ``w_q = 2·quantize_b(tanh(w)/(2 max|tanh
  w|) + 1/2) − 1``. The first and last layers stay fp32 (``first_last_bits: null``).

Mixed precision (``bits_per_layer``): a mapping ``{layer: bits | [w_bits, a_bits]}`` set by hand,
or ``sensitivity``: at ``start_epoch`` (after fp32 epochs) every layer alone is quantized to each
of ``sensitivity.candidates`` bits (weights and activations) and the increase of the validation
loss is measured; bits are then lowered greedily — the layer whose next-lower candidate costs the
least loss per byte saved goes first — until the quantized layers' weights average
``sensitivity.budget_bits`` bits. The most sensitive layers keep the most bits.

The quantizer formulas are :mod:`compresslab.compress.quant.quantizers`; the artifact
(``compresslab.actquant/1``, :mod:`compresslab.compress.codecs.lsq_pact`) stores each quantized
layer's weight codes bit-packed at its own width with the quantizers' parameters, and reloads
computing exactly what the trained model computed.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.quant.lsq_pact_callback import ActQuantCallback
from compresslab.compress.base import CompressionMethod
from compresslab.compress.quant.bit_allocation import allocate_bits
from compresslab.compress.codecs.lsq_pact import QUANT_BUFFERS, QUANT_PARAMS, encode_actquant
from compresslab.compress.common import select_layers
from compresslab.compress.quant.options import ActQuantOptions
from compresslab.compress.quant.quantizers import (
    FP32,
    dorefa_quantize,
    features_per_sample,
    lsq_init_step,
    lsq_quantize,
    pact_quantize,
)
from compresslab.compress.quant.swap import SwapHooks, strip_swaps, swap_forward
from compresslab.errors import ConfigError


# ---- per-layer quantization (swapped forward) --------------------------------------------------------
class _LayerQuant:
    """The swapped forward of one layer (state lives in the layer's aq_* parameters/buffers)."""

    def __init__(self, method: "ActQuant") -> None:
        self.method = method

    def _on(self, module) -> bool:
        return self.method.active and int(module.aq_bits[0]) != FP32

    def weight(self, module: nn.Module, w: torch.Tensor) -> torch.Tensor:
        if not self._on(module):
            return w
        bits = int(module.aq_bits[0])
        if self.method.scheme == "pact":
            return dorefa_quantize(w, bits)
        if int(module.aq_signed[1]) == 0:  # the weight step is initialised at the first training batch
            if not module.training:
                return w
            _init_weight_step(module, "lsq")
        return lsq_quantize(w, module.aq_w_step, bits, True, w.numel())

    def input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self._on(module):
            return x
        bits = int(module.aq_bits[1])
        if int(module.aq_signed[0]) < 0:  # first batch: signedness and (LSQ) the initial step
            if not module.training:
                return x
            init_activation(module, x, self.method.scheme, bits)
        signed = bool(int(module.aq_signed[0]))
        if self.method.scheme == "pact":
            return pact_quantize(x, module.aq_alpha, bits, signed)
        return lsq_quantize(x, module.aq_a_step, bits, signed, features_per_sample(x))


@torch.no_grad()
def init_activation(module: nn.Module, x: torch.Tensor, scheme: str, bits: int) -> None:
    """Signedness of the layer's input from ``x``; LSQ's initial activation step from ``x``."""
    signed = bool((x < 0).any())
    module.aq_signed[0] = int(signed)
    if scheme == "lsq":
        module.aq_a_step.copy_(lsq_init_step(x, bits, signed))


def _init_weight_step(module: nn.Module, scheme: str) -> None:
    if scheme == "lsq" and int(module.aq_bits[0]) != FP32:
        with torch.no_grad():
            module.aq_w_step.copy_(lsq_init_step(module.weight, int(module.aq_bits[0]), True))
        module.aq_signed[1] = 1


def parse_layer_bits(value: Any, where: str) -> tuple[int, int]:
    """``4`` -> (4, 4); ``[4, 8]`` -> (4, 8); 32 or "fp32" keeps the layer fp32 (the widths themselves
    are checked by :class:`~compresslab.compress.quant.options.ActQuantOptions`)."""
    if value == "fp32":
        return FP32, FP32
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{where}={list(value)!r}: a layer's bits are one width or two, [w_bits, a_bits]")
        return int(value[0]), int(value[1])
    return int(value), int(value)


# ---- the method --------------------------------------------------------------------------------------
class ActQuant(CompressionMethod):
    """LSQ / PACT QAT of weights and activations (see the module docstring)."""

    options = ActQuantOptions

    def __init__(self, name: str, scheme: str = "lsq", weight_bits: int = 4, act_bits: int = 4,
                 first_last_bits: int | None = 8, exclude: Sequence[str] = (), bits_per_layer: Any = None,
                 sensitivity: Mapping[str, Any] | None = None, alpha_init: float | None = None,
                 alpha_decay: float | None = None, start_epoch: int = 0) -> None:
        super().__init__(name)
        self.scheme, self.weight_bits, self.act_bits = scheme, int(weight_bits), int(act_bits)
        self.first_last = None if first_last_bits is None else parse_layer_bits(first_last_bits,
                                                                                "quant.first_last_bits")
        self.exclude = list(exclude or [])
        self.start_epoch = int(start_epoch)
        if scheme == "lsq" and (alpha_init is not None or alpha_decay is not None):
            raise ConfigError("quant.alpha_init / quant.alpha_decay are PACT's clipping parameter; scheme=lsq learns "
                              "step sizes instead: remove them (or use quant=pact)")
        self.alpha_init = 10.0 if alpha_init is None else float(alpha_init)
        self.alpha_decay = 2e-4 if alpha_decay is None else float(alpha_decay)
        self.sensitivity_mode = bits_per_layer == "sensitivity"
        self.manual: dict[str, tuple[int, int]] = {}
        if bits_per_layer is not None and not self.sensitivity_mode:
            self.manual = {str(k): parse_layer_bits(v, f"quant.bits_per_layer.{k}") for k, v in bits_per_layer.items()}
        sens = dict(sensitivity or {})
        self.candidates = sorted(int(b) for b in sens.get("candidates", [2, 4, 8]))
        self.budget_bits = float(sens.get("budget_bits", 4.0))
        self.sens_batches = int(sens.get("batches", 4))
        if self.sensitivity_mode:
            if not self.candidates or not self.candidates[0] <= self.budget_bits <= self.candidates[-1]:
                raise ConfigError(f"quant.sensitivity.budget_bits={self.budget_bits} must lie between the smallest and "
                                  f"largest candidate {self.candidates}")
            if self.start_epoch < 1:
                raise ConfigError("quant.bits_per_layer=sensitivity measures each layer's sensitivity on the trained "
                                  "fp32 weights at quant.start_epoch; set quant.start_epoch >= 1 (e.g. half the epochs)")
        self.active = self.start_epoch <= 0
        self.layer_bits: dict[str, tuple[int, int]] = {}
        self.uniform_layers: list[str] = []
        self.sensitivity_table: list[dict] = []
        self._report: dict[str, Any] = {}

    # ---- which layers get which bits -----------------------------------------------------------------
    def plan(self, student: nn.Module) -> dict[str, tuple[int, int]]:
        """(weight bits, act bits) of every conv/linear layer the method swaps (32 = fp32 compute)."""
        layers = list(select_layers(student, self.exclude))
        if not layers:
            raise ConfigError(f"quant={self.name}: the student has no conv/linear layer to quantize")
        unknown = sorted(set(self.manual) - set(layers))
        if unknown:
            raise ConfigError(f"quant.bits_per_layer names {unknown}, which are not quantizable layers of the student; "
                              f"choose from {layers}")
        out = {}
        self.uniform_layers = []
        for i, name in enumerate(layers):
            edge = i in (0, len(layers) - 1) and len(layers) > 2
            if name in self.manual:
                out[name] = self.manual[name]
            elif edge:
                out[name] = self.first_last if self.first_last is not None else (FP32, FP32)
            else:
                out[name] = (self.weight_bits, self.act_bits)
                self.uniform_layers.append(name)
        return out

    def validate_student(self, student: nn.Module, datamodule) -> None:
        self.plan(student)

    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        deferred = student.__dict__.get("_cl_deferred_lowrank")
        if deferred:
            raise ConfigError(f"quant={self.name} with lowrank={deferred}: the decomposition replaces the conv layers "
                              "during the fit and would drop their quantizers; run them in separate jobs")
        self.layer_bits = self.plan(student)
        modules = dict(student.named_modules())
        for name, (wb, ab) in self.layer_bits.items():
            module = modules[name]
            module.register_buffer("aq_bits", torch.tensor([wb, ab], dtype=torch.int64))
            module.register_buffer("aq_signed", torch.tensor([-1, 0], dtype=torch.int64))  # [act signed, w init]
            if self.scheme == "lsq":
                module.aq_w_step = nn.Parameter(torch.ones(()))
                module.aq_a_step = nn.Parameter(torch.ones(()))
            else:
                module.aq_alpha = nn.Parameter(torch.tensor(self.alpha_init))
            swap_forward(module, SwapHooks(weight=_LayerQuant(self).weight, input=_LayerQuant(self).input))
        return student

    def callbacks(self) -> list[Callback]:
        return [ActQuantCallback(self)]

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        self.active = True
        return student

    # ---- sensitivity-based mixed precision ---------------------------------------------------------------
    @torch.no_grad()
    def assign_by_sensitivity(self, model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Measure each layer's val-loss increase at each candidate bit width, then allocate bits
        under the budget (see the module docstring) and write them into the layers."""
        modules = dict(model.named_modules())
        names = list(self.uniform_layers)  # hand-set and first/last layers keep their bits
        was_training, was_active = model.training, self.active
        model.eval()
        saved = {n: modules[n].aq_bits.clone() for n in self.layer_bits}

        def loss() -> float:
            total, count = 0.0, 0
            for x, y in batches:
                total += float(F.cross_entropy(model(x), y, reduction="sum"))
                count += y.numel()
            return total / max(1, count)

        try:
            self.active = True
            for n in self.layer_bits:  # everything fp32 but the layer under test
                modules[n].aq_bits.fill_(FP32)
            base = loss()
            delta: dict[str, dict[int, float]] = {}
            for n in names:
                m = modules[n]
                delta[n] = {}
                for b in self.candidates:
                    m.aq_bits.fill_(b)
                    self._init_layer(m, n, batches[0][0], model)
                    delta[n][b] = loss() - base
                    self.sensitivity_table.append({"layer": n, "bits": b, "val_loss_increase": delta[n][b]})
                m.aq_bits.fill_(FP32)
        finally:
            for n, bits in saved.items():
                modules[n].aq_bits.copy_(bits)
            self.active = was_active
            model.train(was_training)
        sizes = {n: modules[n].weight.numel() for n in names}
        chosen = allocate_bits(delta, sizes, self.candidates, self.budget_bits)
        for n, b in chosen.items():
            self.layer_bits[n] = (b, b)
            modules[n].aq_bits.copy_(torch.tensor([b, b]))

    @torch.no_grad()
    def _init_layer(self, module: nn.Module, name: str, x: torch.Tensor, model: nn.Module) -> None:
        """Initialise one layer's quantizers for its current bits from a batch ``x`` of the model's input."""
        _init_weight_step(module, self.scheme)
        captured = {}
        handle = module.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0].detach()))
        was_active, self.active = self.active, False
        try:
            model(x)
        finally:
            self.active = was_active
            handle.remove()
        init_activation(module, captured["x"], self.scheme, int(module.aq_bits[1]))

    # ---- export ------------------------------------------------------------------------------------------
    def export(self, student: nn.Module, context: dict[str, Any]) -> dict:
        payload, stats = encode_actquant(student, self.scheme, context)
        self._report = {**stats, "quant_method": self.name, "act_quant_scheme": self.scheme,
                        "weight_bits": self.weight_bits,
                        "act_bits": self.act_bits,
                        "first_last_bits": None if self.first_last is None else list(self.first_last),
                        "bits_per_layer_source": "sensitivity" if self.sensitivity_mode
                        else ("manual" if self.manual else "uniform")}
        if self.sensitivity_table:
            self._report["sensitivity"] = self.sensitivity_table
        return payload

    def report(self) -> dict[str, Any]:
        return dict(self._report)


def strip_actquant(model: nn.Module) -> nn.Module:
    """Return the layers to their plain forward and drop the aq_* parameters/buffers."""
    return strip_swaps(model, QUANT_BUFFERS, QUANT_PARAMS)
