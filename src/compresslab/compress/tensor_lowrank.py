"""Tensor decompositions of convolution kernels: Tucker-2 and CP, computed with tensorly.

- ``lowrank=tucker`` — Tucker-2 (Kim et al., "Compression of Deep Convolutional Neural Networks
  for Fast and Low Power Mobile Applications", ICLR 2016). A ``T x S x kh x kw`` kernel becomes
  ``K[t,s,j,i] ≈ Σ_{a,b} C[a,b,j,i] U[t,a] V[s,b]`` (``tensorly.decomposition.partial_tucker`` on the
  two channel modes, HOOI from an SVD start), i.e. three real layers: a ``1x1`` conv ``S -> R_in``
  (``V^T``), the ``kh x kw`` core conv ``R_in -> R_out`` (the original stride/padding/dilation), and a
  ``1x1`` conv ``R_out -> T`` (``U``, with the bias). A mode whose rank equals its channel count is
  not factorized (Tucker-1, as the paper does for the first layer). Ranks: by hand (``ranks``), from
  ``rank_ratio`` of the channels, by an ``energy`` threshold on the singular values of each mode's
  unfolding, or — the paper's choice — by global analytic VBMF (Nakajima et al., JMLR 2013) on
  the two unfoldings (:func:`evbmf_rank`).
- ``lowrank=cp`` — CP (Lebedev et al., "Speeding-up Convolutional Neural Networks Using
  Fine-tuned CP-Decomposition", ICLR 2015): ``K[t,s,j,i] ≈ Σ_r λ_r A_t[t,r] A_s[s,r] A_y[j,r] A_x[i,r]``
  (``tensorly.decomposition.parafac``, ALS; the paper used non-linear least squares), i.e. four
  layers: ``1x1`` conv ``S -> R``, depthwise ``kh x 1`` conv, depthwise ``1 x kw`` conv (stride and
  padding split between them), ``1x1`` conv ``R -> T`` (``λ A_t``, with the bias). Rank: by hand
  (``ranks``), or ``param_ratio`` of the layer's parameters, or the larger VBMF rank of the two
  channel unfoldings (a common practice, not the paper's, which chose ranks by hand).

Both decompose the *trained* kernels at ``start_epoch`` (negative: counted from the end; 0
decomposes the initialization, i.e. trains the factorized network from scratch) and fine-tune the
factors for the remaining epochs, as both papers do. The modules are swapped during the fit and the
optimizer follows the new parameters; epochs before the decomposition cannot be the val-selected
checkpoint. The artifact is ``compresslab.lowrank/1`` (arch spec + per-layer kind and ranks +
state dict): it rebuilds the factorized shapes from the plan, in a fresh process. Only ``k x k``
Conv2d layers with ``k > 1`` and ``groups = 1`` are decomposed; linear and 1x1 layers stay dense
(``lowrank=svd`` factorizes those).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.quantization.layers import hide_epoch_from_selection, quantizable_layers
from compresslab.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

DECOMPOSITIONS = ("tucker2", "cp")
RANK_MODES = {"tucker2": ("vbmf", "energy", "ratio"), "cp": ("vbmf", "params")}


# ---- factorized modules ----------------------------------------------------------------------------
class Tucker2Conv(nn.Module):
    """``last(core(first(x)))``: 1x1 ``S -> R_in``, ``kh x kw`` core ``R_in -> R_out``, 1x1 ``R_out -> T``;
    ``first`` / ``last`` are identities when that mode keeps all its channels."""

    kind = "tucker2"

    def __init__(self, conv: nn.Conv2d, rank_out: int, rank_in: int) -> None:
        super().__init__()
        t, s = conv.out_channels, conv.in_channels
        self.rank = [int(rank_out), int(rank_in)]
        r_out, r_in = self.rank
        bias = conv.bias is not None
        self.first = nn.Conv2d(s, r_in, 1, bias=False) if r_in < s else nn.Identity()
        self.core = nn.Conv2d(r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, bias=bias and r_out >= t)
        self.last = nn.Conv2d(r_out, t, 1, bias=bias) if r_out < t else nn.Identity()

    def forward(self, x):
        return self.last(self.core(self.first(x)))


class CPConv(nn.Module):
    """Lebedev et al.'s four layers: 1x1 ``S -> R``, depthwise ``kh x 1``, depthwise ``1 x kw``, 1x1 ``R -> T``."""

    kind = "cp"

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        self.rank = int(rank)
        r = self.rank
        self.pw_in = nn.Conv2d(conv.in_channels, r, 1, bias=False)
        self.dw_v = nn.Conv2d(r, r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=r, bias=False)
        self.dw_h = nn.Conv2d(r, r, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=r, bias=False)
        self.pw_out = nn.Conv2d(r, conv.out_channels, 1, bias=conv.bias is not None)

    def forward(self, x):
        return self.pw_out(self.dw_h(self.dw_v(self.pw_in(x))))


TENSOR_MODULES = (Tucker2Conv, CPConv)


def build_factorized(conv: nn.Conv2d, kind: str, rank: Any) -> nn.Module:
    """An (uninitialised) factorized module of ``kind`` with ``rank`` for ``conv`` (used by plans)."""
    if kind == "tucker2":
        r_out, r_in = (int(v) for v in rank)
        return Tucker2Conv(conv, r_out, r_in)
    if kind == "cp":
        return CPConv(conv, int(rank))
    raise CheckpointError(f"unknown tensor low-rank kind {kind!r}")


def factor_params(conv: nn.Conv2d, kind: str, rank: Any) -> int:
    """Weights of the factorized layer (biases excluded)."""
    t, s, kh, kw = conv.weight.shape
    if kind == "tucker2":
        r_out, r_in = rank
        return (s * r_in if r_in < s else 0) + r_out * r_in * kh * kw + (r_out * t if r_out < t else 0)
    return int(rank) * (s + kh + kw + t)


# ---- the decompositions (tensorly) -----------------------------------------------------------------
def _kernel(w: torch.Tensor) -> torch.Tensor:
    """The kernel as a float64 CPU tensor for tensorly's pytorch backend."""
    return w.detach().cpu().double()


class _tensorly_torch:
    """tensorly's pytorch backend on one thread: the ALS/HOOI steps are many small products, and
    with several threads on a loaded 2-core machine they ran ~10x slower than on one."""

    def __enter__(self):
        import tensorly as tl

        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._ctx = tl.backend_context("pytorch")
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self._ctx.__exit__(*exc)
        finally:
            torch.set_num_threads(self._threads)


@torch.no_grad()
def tucker2_factorize(conv: nn.Conv2d, rank_out: int, rank_in: int, n_iter_max: int = 100) -> Tucker2Conv:
    """Tucker-2 of ``conv``'s kernel with ``partial_tucker`` (modes 0 and 1), as a :class:`Tucker2Conv`."""
    from tensorly.decomposition import partial_tucker

    t, s = conv.out_channels, conv.in_channels
    w = _kernel(conv.weight)
    modes, ranks = [], []
    if rank_out < t:
        modes.append(0)
        ranks.append(int(rank_out))
    if rank_in < s:
        modes.append(1)
        ranks.append(int(rank_in))
    new = Tucker2Conv(conv, rank_out, rank_in)
    if not modes:
        core, factors = w, []
    else:
        with _tensorly_torch():
            (core, factors), _ = partial_tucker(w, rank=ranks, modes=modes, init="svd", n_iter_max=n_iter_max)
    factor = dict(zip(modes, factors))
    dtype, device = conv.weight.dtype, conv.weight.device

    def tensor(a):
        return torch.as_tensor(a).to(dtype=dtype, device=device).contiguous()

    new.core.weight.copy_(tensor(core))
    if 1 in factor:  # V: S x R_in -> first.weight[b, s] = V[s, b]
        new.first.weight.copy_(tensor(factor[1].T)[:, :, None, None])
    if 0 in factor:  # U: T x R_out -> last.weight[t, a] = U[t, a]
        new.last.weight.copy_(tensor(factor[0])[:, :, None, None])
    if conv.bias is not None:
        (new.last if 0 in factor else new.core).bias.copy_(conv.bias)
    return new.to(device).train(conv.training)


@torch.no_grad()
def cp_factorize(conv: nn.Conv2d, rank: int, n_iter_max: int = 50, seed: int = 0, tol: float = 1e-6) -> CPConv:
    """CP of ``conv``'s kernel with ``parafac`` (ALS from an SVD start, stopping when the relative
    reconstruction error changes by less than ``tol``), as a :class:`CPConv`."""
    from tensorly.decomposition import parafac

    w = _kernel(conv.weight)
    with warnings.catch_warnings(), _tensorly_torch():
        warnings.simplefilter("ignore")  # rank > a mode's size: tensorly pads the SVD start (it warns)
        cp = parafac(w, rank=int(rank), init="svd", n_iter_max=n_iter_max, tol=tol, random_state=seed)
    weights, (a_t, a_s, a_y, a_x) = cp.weights, cp.factors
    new = CPConv(conv, rank)
    dtype, device = conv.weight.dtype, conv.weight.device

    def tensor(a):
        return torch.as_tensor(a).to(dtype=dtype, device=device).contiguous()

    new.pw_in.weight.copy_(tensor(a_s.T)[:, :, None, None])          # [r, s]
    new.dw_v.weight.copy_(tensor(a_y.T)[:, None, :, None])           # [r, 1, j, 1]
    new.dw_h.weight.copy_(tensor(a_x.T)[:, None, None, :])           # [r, 1, 1, i]
    new.pw_out.weight.copy_(tensor(a_t * torch.as_tensor(weights)[None, :])[:, :, None, None])  # [t, r]
    if conv.bias is not None:
        new.pw_out.bias.copy_(conv.bias)
    return new.to(device).train(conv.training)


# ---- rank selection --------------------------------------------------------------------------------
def _evbmf_objective(sigma2: float, s2: np.ndarray, L: int, M: int, xubar: float) -> float:
    """Nakajima et al.'s objective for the noise variance (sum of ψ over the scaled squared singular values)."""
    alpha = L / M
    x = s2 / (M * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    tau = 0.5 * (z1 - (1 + alpha) + np.sqrt(np.maximum((z1 - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))
    return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - tau) + np.sum(np.log((tau + 1) / z1))
                 + alpha * np.sum(np.log(tau / alpha + 1)))


def evbmf_rank(matrix: np.ndarray | torch.Tensor) -> int:
    """Rank of a matrix by empirical (global analytic) VBMF, Nakajima et al., JMLR 2013: the noise
    variance σ² minimises their objective over its theoretical bounds, and the rank is the number of
    singular values above ``sqrt(M σ² (1 + τ̄)(1 + α/τ̄))``, ``α = L/M``, ``τ̄ = 2.5129 sqrt(α)``."""
    from scipy.optimize import minimize_scalar

    y = matrix.detach().cpu().double().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, float)
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = torch.linalg.svdvals(torch.from_numpy(y)).numpy()
    s2 = s ** 2
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eh_ub = int(min(math.ceil(L / (1 + alpha)) - 1, L)) - 1
    upper = s2.sum() / (L * M)
    lower = max(s2[eh_ub + 1] / (M * xubar), float(np.mean(s2[eh_ub + 1:])) / M) if eh_ub + 1 < L else upper * 1e-6
    lower = max(lower, upper * 1e-12, 1e-300)
    if not lower < upper:
        return 0
    sigma2 = minimize_scalar(_evbmf_objective, args=(s2, L, M, xubar), bounds=(lower, upper), method="bounded").x
    threshold = math.sqrt(M * sigma2 * xubar)
    return int(np.sum(s > threshold))


def unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``w.shape[mode]`` rows."""
    return torch.movedim(w.detach().double(), mode, 0).reshape(w.shape[mode], -1)


def energy_rank(matrix: torch.Tensor, energy: float) -> int:
    """Smallest r whose top singular values keep ``energy`` of the sum of their squares."""
    e = torch.linalg.svdvals(matrix.double()) ** 2
    cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
    return int(torch.searchsorted(cum, torch.tensor(float(energy), dtype=cum.dtype)).item()) + 1


# ---- the method --------------------------------------------------------------------------------------
class TensorLowRank(CompressionMethod):
    """``lowrank=tucker`` / ``lowrank=cp`` (see the module docstring)."""

    def __init__(self, name: str, decomposition: str = "tucker2", rank_mode: str = "vbmf",
                 rank_ratio: float | None = None, energy: float | None = None, param_ratio: float | None = None,
                 ranks: Mapping[str, Any] | None = None, start_epoch: int = -8, min_rank: int = 1,
                 exclude: Sequence[str] = (), only_if_smaller: bool = True, n_iter_max: int = 100) -> None:
        super().__init__(name)
        if decomposition not in DECOMPOSITIONS:
            raise ConfigError(f"lowrank.decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
        self.decomposition = decomposition
        modes = RANK_MODES[decomposition]
        if rank_mode not in modes:
            raise ConfigError(f"lowrank.rank_mode for {decomposition} must be one of {modes}, got {rank_mode!r}")
        self.rank_mode = rank_mode
        needs = {"ratio": ("rank_ratio", rank_ratio), "energy": ("energy", energy), "params": ("param_ratio", param_ratio)}
        for mode, (key, value) in needs.items():
            if mode == rank_mode and value is None:
                raise ConfigError(f"lowrank.rank_mode={mode} needs lowrank.{key}")
            if mode != rank_mode and value is not None:
                raise ConfigError(f"lowrank.{key} is only used with lowrank.rank_mode={mode} (here rank_mode="
                                  f"{rank_mode}); remove it or set rank_mode={mode}")
            if value is not None and not 0.0 < float(value) <= 1.0:
                raise ConfigError(f"lowrank.{key} must be in (0, 1], got {value}")
        self.rank_ratio = None if rank_ratio is None else float(rank_ratio)
        self.energy = None if energy is None else float(energy)
        self.param_ratio = None if param_ratio is None else float(param_ratio)
        self.ranks = {str(k): self._parse_rank(k, v) for k, v in dict(ranks or {}).items()}
        self.start_epoch, self.min_rank = int(start_epoch), int(min_rank)
        if self.min_rank < 1:
            raise ConfigError(f"lowrank.min_rank must be >= 1, got {min_rank}")
        self.exclude, self.only_if_smaller = list(exclude or []), bool(only_if_smaller)
        self.n_iter_max = int(n_iter_max)
        self.layer_info: dict[str, dict] = {}
        self.done = False
        self._callback: TensorLowRankCallback | None = None

    def _parse_rank(self, layer: Any, value: Any):
        if self.decomposition == "tucker2":
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(int(v) >= 1 for v in value)):
                raise ConfigError(f"lowrank.ranks.{layer}: Tucker-2 takes [rank_out, rank_in], got {value!r}")
            return [int(v) for v in value]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"lowrank.ranks.{layer}: CP takes one positive integer rank, got {value!r}")
        return int(value)

    def targets(self, model: nn.Module) -> dict[str, nn.Conv2d]:
        """The ``k x k`` (k > 1), ungrouped Conv2d layers not excluded."""
        return {n: m for n, m in quantizable_layers(model, self.exclude).items()
                if type(m) is nn.Conv2d and m.groups == 1 and max(m.kernel_size) > 1 and m.padding_mode == "zeros"}

    def validate_student(self, student: nn.Module, datamodule) -> None:
        targets = self.targets(student)
        if not targets:
            raise ConfigError(f"lowrank={self.name} decomposes k x k Conv2d kernels and the student "
                              f"({type(student).__name__}) has none; use a conv student (resnet20, vgg8, lenet5, ...) or "
                              "lowrank=svd")
        unknown = sorted(set(self.ranks) - set(targets))
        if unknown:
            raise ConfigError(f"lowrank.ranks names {unknown}, not decomposable conv layers; choose from {list(targets)}")
        for name, rank in self.ranks.items():
            conv = targets[name]
            if self.decomposition == "tucker2" and (rank[0] > conv.out_channels or rank[1] > conv.in_channels):
                raise ConfigError(f"lowrank.ranks.{name}={rank} exceeds the layer's channels "
                                  f"[{conv.out_channels}, {conv.in_channels}]")

    def choose_rank(self, name: str, conv: nn.Conv2d):
        """The rank of ``conv`` (hand-set, or from its current weights by ``rank_mode``)."""
        if name in self.ranks:
            return self.ranks[name]
        w = conv.weight
        t, s, kh, kw = w.shape
        if self.decomposition == "tucker2":
            if self.rank_mode == "vbmf":
                r = [evbmf_rank(unfold(w, 0)), evbmf_rank(unfold(w, 1))]
            elif self.rank_mode == "energy":
                r = [energy_rank(unfold(w, 0), self.energy), energy_rank(unfold(w, 1), self.energy)]
            else:
                r = [round(self.rank_ratio * t), round(self.rank_ratio * s)]
            return [max(self.min_rank, min(t, r[0])), max(self.min_rank, min(s, r[1]))]
        if self.rank_mode == "vbmf":
            r = max(evbmf_rank(unfold(w, 0)), evbmf_rank(unfold(w, 1)))
        else:
            r = math.floor(self.param_ratio * w.numel() / (s + kh + kw + t))
        return max(self.min_rank, int(r))

    def resolve_start(self, max_epochs: int) -> int:
        return self.start_epoch if self.start_epoch >= 0 else max(0, int(max_epochs) + self.start_epoch)

    @torch.no_grad()
    def decompose(self, model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        """Replace every target layer of ``model`` by its decomposition (in place); returns (old, new) pairs."""
        from compresslab.compress.lowrank import _set_module

        from compresslab.compress.quantization.layers import is_swapped

        swapped = []
        for name, conv in self.targets(model).items():
            if is_swapped(conv):
                raise ConfigError(f"lowrank={self.name}: {name} already carries a quantizer (quant=...), which the "
                                  "decomposition would drop; run the quantization on a decomposed artifact instead")
            rank = self.choose_rank(name, conv)
            dense, fact = conv.weight.numel(), factor_params(conv, self.decomposition, rank)
            info = {"rank": rank, "channels": [conv.out_channels, conv.in_channels], "params_dense": int(dense),
                    "params_factorized": int(fact)}
            if self.only_if_smaller and fact >= dense:
                info.update(rank=None, params_factorized=int(dense), note="kept dense (no saving)")
                self.layer_info[name] = info
                continue
            if self.decomposition == "tucker2":
                new = tucker2_factorize(conv, rank[0], rank[1], self.n_iter_max)
            else:
                new = cp_factorize(conv, rank, max(self.n_iter_max, 1))
            with torch.no_grad():
                x = torch.randn(2, conv.in_channels, 8, 8, device=conv.weight.device, dtype=conv.weight.dtype)
                ref = conv(x)
                info["rel_error"] = float((new(x) - ref).norm() / ref.norm().clamp_min(1e-12))
            _set_module(model, name, new)
            self.layer_info[name] = info
            swapped.append((conv, new))
        self.done = True
        return swapped

    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        self.validate_student(student, datamodule)
        student.__dict__["_cl_deferred_lowrank"] = self.name  # later methods can see the layers will change
        return student

    def callbacks(self) -> list[Callback]:
        self._callback = TensorLowRankCallback(self)
        return [self._callback]

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        if self._callback is not None:
            for handle in self._callback._handles:
                handle.remove()
            self._callback._handles.clear()
        if not any(isinstance(m, TENSOR_MODULES) for m in student.modules()):  # never switched during the fit
            log.warning("lowrank=%s: the decomposition epoch was never reached; decomposing the final weights "
                        "without fine-tuning", self.name)
            self.decompose(student)
            self.finetuned = False
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict:
        from compresslab.compress.lowrank import lowrank_payload

        return lowrank_payload(student, context)

    finetuned = True

    def report(self) -> dict[str, Any]:
        done = {n: i for n, i in self.layer_info.items() if i.get("rank") is not None}
        return {
            "lowrank_method": self.name,
            "lowrank_decomposition": self.decomposition,
            "lowrank_rank_mode": self.rank_mode,
            "lowrank_ranks": {n: i["rank"] for n, i in done.items()},
            "lowrank_rel_error_at_decomposition": {n: round(i["rel_error"], 5) for n, i in done.items()},
            "lowrank_kept_dense": sorted(n for n, i in self.layer_info.items() if i.get("rank") is None),
            "lowrank_layer_params_before": int(sum(i["params_dense"] for i in self.layer_info.values())),
            "lowrank_layer_params_after": int(sum(i["params_factorized"] for i in self.layer_info.values())),
            "lowrank_finetuned": bool(self.finetuned),
        }


def _resize_pre_hook(module: nn.Module, state_dict, prefix, *args) -> None:
    """Before loading a checkpoint written after the decomposition, decompose the matching layers
    (shapes read from the state dict) so the keys and shapes agree (resume / val-best reload)."""
    from compresslab.compress.lowrank import _set_module

    for name, conv in list(module.named_modules()):
        if type(conv) is not nn.Conv2d:
            continue
        base = prefix + (f"{name}." if name else "")
        if f"{base}weight" in state_dict:
            continue
        if f"{base}core.weight" in state_dict:
            r_out, r_in = state_dict[f"{base}core.weight"].shape[:2]
            _set_module(module, name, Tucker2Conv(conv, int(r_out), int(r_in)).to(conv.weight.device))
        elif f"{base}pw_in.weight" in state_dict:
            _set_module(module, name, CPConv(conv, int(state_dict[f"{base}pw_in.weight"].shape[0])).to(
                conv.weight.device))


class TensorLowRankCallback(Callback):
    """Decomposes at ``start_epoch``, points the optimizers at the factors (their moments start
    fresh), and keeps earlier epochs out of the val selection."""

    def __init__(self, method: TensorLowRank) -> None:
        self.method = method
        self._handles: list = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.world_size > 1:
            raise ConfigError(f"lowrank={self.method.name} replaces layers during the fit, which DDP does not allow; "
                              "run it on one device")
        if not self._handles:
            self._handles.append(pl_module.model.register_load_state_dict_pre_hook(_resize_pre_hook))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        if trainer.current_epoch < self.method.resolve_start(trainer.max_epochs):
            return
        if any(isinstance(m, TENSOR_MODULES) for m in model.modules()):
            return  # already decomposed (or resumed from a decomposed checkpoint)
        swapped = self.method.decompose(model)
        old = {id(p) for conv, _ in swapped for p in conv.parameters()}
        new = [p for _, fact in swapped for p in fact.parameters()]
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                if any(id(p) in old for p in group["params"]):
                    group["params"] = [p for p in group["params"] if id(p) not in old] + new
                    new = []
            for p in [p for p in opt.state if id(p) in old]:
                del opt.state[p]
        if new and trainer.optimizers:  # the dense layers were in no group (frozen): train the factors anyway
            trainer.optimizers[0].param_groups[0]["params"].extend(new)
        before = sum(i["params_dense"] for i in self.method.layer_info.values())
        after = sum(i["params_factorized"] for i in self.method.layer_info.values())
        log.info("lowrank=%s: decomposed %d layers at epoch %d (%d -> %d weights)", self.method.name, len(swapped),
                 trainer.current_epoch, before, after)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.method.resolve_start(trainer.max_epochs):
            hide_epoch_from_selection(trainer)



__all__ = ["TensorLowRank", "Tucker2Conv", "CPConv", "tucker2_factorize", "cp_factorize", "evbmf_rank",
           "energy_rank", "unfold", "build_factorized", "TENSOR_MODULES"]
