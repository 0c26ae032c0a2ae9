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

The artifact (``compresslab.actquant/1``) stores each quantized layer's weight codes bit-packed
at its own width, its step size (LSQ) and the activation quantizer's parameters (step or α,
signedness, bits); the other tensors (fp32 first/last layers, BN, biases) are stored as they are.
:func:`load_actquant_payload` rebuilds the model with the dequantized weights and the activation
fake-quantizers, computing exactly what the trained model computed (fp32 kernels: the
integer arithmetic is simulated).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.bitpack import flatten_state, pack_bits, unflatten_state, unpack_bits
from compresslab.compress.quantization.layers import (
    QUANTIZABLE,
    SwapHooks,
    build_structure,
    hide_epoch_from_selection,
    quantizable_layers,
    restore_forward,
    structure_of,
    swap_forward,
)
from compresslab.errors import CheckpointError, ConfigError

ACTQUANT_FORMAT = "compresslab.actquant/1"
SCHEMES = ("lsq", "pact")
BITS = (2, 3, 4, 5, 6, 7, 8)
FP32 = 32  # "bits" of a layer left in fp32
_BUFFERS = ("aq_bits", "aq_signed")
_PARAMS = ("aq_w_step", "aq_a_step", "aq_alpha")


# ---- the quantizers (pure functions; the tests compare them with the papers' formulas) ------------
def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass (bit-exact), gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (bit-exact) with the straight-through gradient."""
    return x.detach().round() + (x - x.detach())


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P): signed ``2^(b-1), 2^(b-1)-1``; unsigned ``0, 2^b-1``."""
    return (1 << (bits - 1), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def lsq_quantize(v: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, n: int) -> torch.Tensor:
    """LSQ: ``round(clip(v/s, -Q_N, Q_P)) * s``, step gradient scaled by ``1/sqrt(n Q_P)``."""
    qn, qp = qrange(bits, signed)
    s = grad_scale(step, 1.0 / math.sqrt(max(1, n) * qp))
    return round_ste(torch.clamp(v / s, -qn, qp)) * s


def lsq_init_step(v: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """LSQ's initial step ``2 mean|v| / sqrt(Q_P)``."""
    _, qp = qrange(bits, signed)
    return (2 * v.detach().abs().mean() / math.sqrt(qp)).clamp_min(1e-8)


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """PACT: clip to ``[0, α]`` (signed inputs: ``[−α, α]``) as ``0.5(|x| − |x − α| + α)``, then
    ``round(y (2^b − 1)/α) α/(2^b − 1)`` with the STE through the rounding (Eq. 3: ``∂y_q/∂α = 1``
    where the input was clipped, 0 elsewhere)."""
    if signed:
        y = 0.5 * ((x + alpha).abs() - (x - alpha).abs())
        levels = (1 << (bits - 1)) - 1
    else:
        y = 0.5 * (x.abs() - (x - alpha).abs() + alpha)
        levels = (1 << bits) - 1
    with torch.no_grad():
        q = torch.round(y * levels / alpha) * alpha / levels
    return q + (y - y.detach())


def dorefa_codes(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa weight codes in ``[0, 2^b − 1]``: ``round((2^b − 1)(tanh w / (2 max|tanh w|) + 1/2))``."""
    t = torch.tanh(w.detach())
    levels = (1 << bits) - 1
    return torch.round((t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5) * levels)


def dorefa_from_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``2 c / (2^b − 1) − 1``."""
    return 2 * codes / ((1 << bits) - 1) - 1


def dorefa_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa-quantized weights (bit-exact ``2c/(2^b − 1) − 1``) with the STE through the rounding:
    the gradient is that of ``2 (tanh w / (2 max|tanh w|) + 1/2) − 1``."""
    t = torch.tanh(w)
    soft = t / t.abs().max().detach().clamp_min(1e-12)
    return dorefa_from_codes(dorefa_codes(w, bits), bits) + (soft - soft.detach())


# ---- per-layer quantization (swapped forward) --------------------------------------------------------
def _features(x: torch.Tensor) -> int:
    return x[0].numel() if x.dim() > 1 else x.numel()


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
        return lsq_quantize(x, module.aq_a_step, bits, signed, _features(x))


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
    """``4`` -> (4, 4); ``[4, 8]`` -> (4, 8); 32 or "fp32" keeps the layer fp32."""
    if isinstance(value, str) and value.lower() == "fp32":
        return FP32, FP32
    if isinstance(value, (list, tuple)) and len(value) == 2:
        pair = tuple(int(v) for v in value)
    elif isinstance(value, int) and not isinstance(value, bool):
        pair = (int(value), int(value))
    else:
        raise ConfigError(f"{where}: a layer's bits are an integer (weights and activations), [w_bits, a_bits] "
                          f"or 'fp32'; got {value!r}")
    for b in pair:
        if b not in BITS and b != FP32:
            raise ConfigError(f"{where}: bits must be in {BITS} (or 32 / 'fp32'), got {value!r}")
    return pair  # type: ignore[return-value]


# ---- the method --------------------------------------------------------------------------------------
class ActQuant(CompressionMethod):
    """LSQ / PACT QAT of weights and activations (see the module docstring)."""

    def __init__(self, name: str, scheme: str = "lsq", weight_bits: int = 4, act_bits: int = 4,
                 first_last_bits: int | None = 8, exclude: Sequence[str] = (), bits_per_layer: Any = None,
                 sensitivity: Mapping[str, Any] | None = None, alpha_init: float | None = None,
                 alpha_decay: float | None = None, start_epoch: int = 0) -> None:
        super().__init__(name)
        if scheme not in SCHEMES:
            raise ConfigError(f"quant.scheme must be one of {SCHEMES}, got {scheme!r}")
        self.scheme = scheme
        self.weight_bits, self.act_bits = parse_layer_bits([weight_bits, act_bits], "quant.weight_bits/act_bits")
        if FP32 in (self.weight_bits, self.act_bits):
            raise ConfigError("quant.weight_bits and quant.act_bits must be in 2..8 (use quant=none for fp32)")
        self.first_last = None if first_last_bits is None else parse_layer_bits(first_last_bits,
                                                                                "quant.first_last_bits")
        self.exclude = list(exclude or [])
        self.start_epoch = int(start_epoch)
        if self.start_epoch < 0:
            raise ConfigError(f"quant.start_epoch must be >= 0, got {start_epoch}")
        if scheme == "lsq" and (alpha_init is not None or alpha_decay is not None):
            raise ConfigError("quant.alpha_init / quant.alpha_decay are PACT's clipping parameter; scheme=lsq learns "
                              "step sizes instead: remove them (or use quant=pact)")
        self.alpha_init = 10.0 if alpha_init is None else float(alpha_init)
        self.alpha_decay = 2e-4 if alpha_decay is None else float(alpha_decay)
        if self.alpha_init <= 0 or self.alpha_decay < 0:
            raise ConfigError(f"quant.alpha_init must be > 0 and quant.alpha_decay >= 0, got {alpha_init}, "
                              f"{alpha_decay}")
        self.sensitivity_mode = isinstance(bits_per_layer, str) and bits_per_layer == "sensitivity"
        self.manual: dict[str, tuple[int, int]] = {}
        if isinstance(bits_per_layer, str) and not self.sensitivity_mode:
            raise ConfigError(f"quant.bits_per_layer must be null, a mapping {{layer: bits}} or 'sensitivity'; "
                              f"got {bits_per_layer!r}")
        if bits_per_layer is not None and not self.sensitivity_mode:
            if not isinstance(bits_per_layer, Mapping):
                raise ConfigError(f"quant.bits_per_layer must be null, a mapping {{layer: bits}} or 'sensitivity'; "
                                  f"got {bits_per_layer!r}")
            self.manual = {str(k): parse_layer_bits(v, f"quant.bits_per_layer.{k}") for k, v in bits_per_layer.items()}
        sens = dict(sensitivity or {})
        unknown = set(sens) - {"candidates", "budget_bits", "batches"}
        if unknown:
            raise ConfigError(f"quant.sensitivity takes candidates, budget_bits and batches; got {sorted(unknown)}")
        self.candidates = sorted(int(b) for b in sens.get("candidates", [2, 4, 8]))
        if not self.candidates or any(b not in BITS for b in self.candidates):
            raise ConfigError(f"quant.sensitivity.candidates must be bit widths in {BITS}, got {self.candidates}")
        self.budget_bits = float(sens.get("budget_bits", 4.0))
        self.sens_batches = int(sens.get("batches", 4))
        if self.sensitivity_mode:
            if not self.candidates[0] <= self.budget_bits <= self.candidates[-1]:
                raise ConfigError(f"quant.sensitivity.budget_bits={self.budget_bits} must lie between the smallest and "
                                  f"largest candidate {self.candidates}")
            if self.start_epoch < 1:
                raise ConfigError("quant.bits_per_layer=sensitivity measures each layer's sensitivity on the trained "
                                  "fp32 weights at quant.start_epoch; set quant.start_epoch >= 1 (e.g. half the epochs)")
            if self.sens_batches < 1:
                raise ConfigError(f"quant.sensitivity.batches must be >= 1, got {self.sens_batches}")
        self.active = self.start_epoch <= 0
        self.layer_bits: dict[str, tuple[int, int]] = {}
        self.uniform_layers: list[str] = []
        self.sensitivity_table: list[dict] = []
        self._report: dict[str, Any] = {}

    # ---- which layers get which bits -----------------------------------------------------------------
    def plan(self, student: nn.Module) -> dict[str, tuple[int, int]]:
        """(weight bits, act bits) of every conv/linear layer the method swaps (32 = fp32 compute)."""
        layers = list(quantizable_layers(student, self.exclude))
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


def allocate_bits(delta: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int], candidates: Sequence[int],
                  budget_bits: float) -> dict[str, int]:
    """Greedy allocation: start every layer at the largest candidate; while the size-weighted
    mean bits exceed ``budget_bits``, lower by one candidate the layer whose step costs the least
    measured loss increase per weight bit saved."""
    cands = sorted(candidates)
    level = {n: len(cands) - 1 for n in delta}
    total = sum(sizes.values())

    def mean_bits() -> float:
        return sum(cands[level[n]] * sizes[n] for n in delta) / max(1, total)

    while mean_bits() > budget_bits + 1e-9:
        best, best_cost = None, math.inf
        for n in delta:
            if level[n] == 0:
                continue
            hi, lo = cands[level[n]], cands[level[n] - 1]
            cost = (delta[n][lo] - delta[n][hi]) / ((hi - lo) * sizes[n])
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            break
        level[best] -= 1
    return {n: cands[level[n]] for n in delta}


class ActQuantCallback(Callback):
    """Turns QAT on at ``start_epoch`` (the sensitivity allocation runs then); earlier epochs
    cannot become the val-selected checkpoint; PACT's α gets its L2 regularizer."""

    def __init__(self, method: ActQuant) -> None:
        self.method = method
        self.assigned = False

    @property
    def state_key(self) -> str:
        return f"compresslab.quant.{self.method.name}"

    def state_dict(self) -> dict[str, Any]:
        return {"assigned": self.assigned, "layer_bits": {k: list(v) for k, v in self.method.layer_bits.items()},
                "sensitivity": list(self.method.sensitivity_table)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.assigned = bool(state_dict.get("assigned", False))
        self.method.layer_bits.update({k: tuple(v) for k, v in state_dict.get("layer_bits", {}).items()})
        self.method.sensitivity_table = list(state_dict.get("sensitivity", []))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        m = self.method
        if trainer.current_epoch >= m.start_epoch and m.sensitivity_mode and not self.assigned:
            dm = trainer.datamodule
            device = next(pl_module.model.parameters()).device
            batches = []
            for i, (x, y) in enumerate(dm.val_dataloader()):
                if i >= m.sens_batches:
                    break
                batches.append((x.to(device), y.to(device)))
            m.assign_by_sensitivity(pl_module.model, batches)
            modules = dict(pl_module.model.named_modules())
            for name in m.layer_bits:  # quantizers re-initialise from the next training batch at their bits
                modules[name].aq_signed.copy_(torch.tensor([-1, 0]))
            self.assigned = True
        m.active = trainer.current_epoch >= m.start_epoch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.method.scheme != "pact" or not self.method.active or self.method.alpha_decay == 0:
            return
        for module in pl_module.model.modules():
            alpha = getattr(module, "aq_alpha", None)
            if isinstance(alpha, nn.Parameter) and alpha.grad is not None:
                alpha.grad.add_(self.method.alpha_decay * alpha.detach())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.method.start_epoch:
            hide_epoch_from_selection(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.method.active = trainer.current_epoch >= self.method.start_epoch


# ---- artifact ----------------------------------------------------------------------------------------
def _act_params(module: nn.Module, scheme: str) -> dict:
    bits = int(module.aq_bits[1])
    if bits == FP32:
        return {"bits": FP32}
    signed = bool(int(module.aq_signed[0])) if int(module.aq_signed[0]) >= 0 else False
    value = module.aq_a_step if scheme == "lsq" else module.aq_alpha
    return {"bits": bits, "signed": signed, "value": float(value.detach())}


def encode_actquant(student: nn.Module, scheme: str, context: Mapping[str, Any]) -> tuple[dict, dict]:
    """The bit-packed payload of a trained LSQ/PACT student and its size statistics."""
    blobs, layers, per_layer = [], [], {}
    offset = fp32_bytes = enc_bytes = n_weights = 0
    skip = set()
    for name, module in student.named_modules():
        if not hasattr(module, "aq_bits"):
            continue
        for key in (*_BUFFERS, *_PARAMS):
            skip.add(f"{name}.{key}")
        wb = int(module.aq_bits[0])
        entry = {"name": name, "w_bits": wb, "act": _act_params(module, scheme)}
        w = module.weight.detach().cpu().float()
        if wb != FP32:
            if scheme == "lsq":
                step = float(module.aq_w_step.detach())
                qn, qp = qrange(wb, True)
                codes = torch.clamp(torch.round(w / step), -qn, qp) + qn
                entry["w_step"] = step
            else:
                codes = dorefa_codes(w, wb)
            packed = pack_bits(codes.to(torch.int64), wb)
            entry.update(shape=[int(s) for s in w.shape], offset=offset, nbytes=int(packed.numel()))
            blobs.append(packed)
            offset += packed.numel()
            skip.add(f"{name}.weight")
            layer_bytes = packed.numel() + (4 if scheme == "lsq" else 0)
            fp32_bytes += w.numel() * 4
            enc_bytes += layer_bytes
            n_weights += w.numel()
        per_layer[name] = [wb, entry["act"]["bits"]]
        layers.append(entry)
    rest = {k: v for k, v in student.state_dict().items() if k not in skip}
    dense, dense_index = flatten_state(rest)
    payload = {
        "format": ACTQUANT_FORMAT,
        "arch": dict(context["arch"]),
        "input_shape": [int(v) for v in context["input_shape"]],
        "num_classes": int(context["num_classes"]),
        "structure": structure_of(student, context),  # (ignores the aq_* tensors: not in the arch's state dict)
        "scheme": scheme,
        "codes": torch.cat(blobs) if blobs else torch.empty(0, dtype=torch.uint8),
        "layers": layers,
        "dense": dense,
        "dense_index": dense_index,
    }
    stats = {
        "quant_backend": "bitpacked_dequantized_fp32",
        "compute": "simulated",
        "bits_per_layer": per_layer,
        "quantized_layers_fp32_bytes": fp32_bytes,
        "quantized_layers_encoded_bytes": enc_bytes,
        "size_ratio_quantized_layers": fp32_bytes / enc_bytes if enc_bytes else None,
        "weight_bits_mean": 8 * enc_bytes / max(1, n_weights),
    }
    return payload, stats


def strip_actquant(model: nn.Module) -> nn.Module:
    """Return the layers to their plain forward and drop the aq_* parameters/buffers."""
    for module in model.modules():
        restore_forward(module)
        for key in _BUFFERS:
            module._buffers.pop(key, None)
        for key in _PARAMS:
            module._parameters.pop(key, None)
    return model


def _act_hook(scheme: str, spec: Mapping[str, Any]):
    bits, signed, value = int(spec["bits"]), bool(spec["signed"]), torch.tensor(float(spec["value"]))
    if scheme == "lsq":
        return lambda module, x: lsq_quantize(x, value.to(x.device), bits, signed, _features(x))
    return lambda module, x: pact_quantize(x, value.to(x.device), bits, signed)


def load_actquant_payload(payload: dict) -> nn.Module:
    """Rebuild a working model (dequantized weights, activation fake-quantizers) from an
    :data:`ACTQUANT_FORMAT` payload."""
    scheme = payload["scheme"]
    if scheme not in SCHEMES:
        raise CheckpointError(f"actquant artifact: unknown scheme {scheme!r}")
    model = build_structure(payload["arch"], payload["input_shape"], payload["num_classes"], payload.get("structure"))
    state = unflatten_state(payload["dense"], payload["dense_index"])
    codes_all = payload["codes"]
    for layer in payload["layers"]:
        wb = int(layer["w_bits"])
        if wb == FP32:
            continue
        n = math.prod(layer["shape"])
        codes = unpack_bits(codes_all[layer["offset"]: layer["offset"] + layer["nbytes"]], wb, n).float()
        codes = codes.reshape(layer["shape"])
        if scheme == "lsq":
            qn, _ = qrange(wb, True)
            w = (codes - qn) * torch.tensor(float(layer["w_step"]))
        else:
            w = dorefa_from_codes(codes, wb)
        state[f"{layer['name']}.weight"] = w
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"actquant artifact does not match its architecture: {exc}") from exc
    modules = dict(model.named_modules())
    for layer in payload["layers"]:
        if int(layer["act"]["bits"]) != FP32:
            module = modules.get(layer["name"])
            if not isinstance(module, QUANTIZABLE):
                raise CheckpointError(f"actquant artifact names {layer['name']}, not a conv/linear layer")
            swap_forward(module, SwapHooks(input=_act_hook(scheme, layer["act"])))
    return model.eval()


__all__ = ["ActQuant", "ACTQUANT_FORMAT", "lsq_quantize", "lsq_init_step", "pact_quantize", "dorefa_quantize",
           "dorefa_codes", "allocate_bits", "load_actquant_payload", "encode_actquant", "strip_actquant"]
