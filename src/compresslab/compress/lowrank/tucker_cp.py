"""Tensor decompositions of convolution kernels, ``lowrank=tucker`` / ``lowrank=cp``: the method
and its callback (the decompositions and rank selection: :mod:`compresslab.compress.lowrank.tensor_decomp`;
the factorized layers: :mod:`compresslab.compress.lowrank.factorized`).

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
checkpoint. The artifact is ``compresslab.lowrank/1`` (:mod:`compresslab.compress.codecs.lowrank`:
arch spec + per-layer kind and ranks + state dict): it rebuilds the factorized shapes from the plan,
in a fresh process. Only ``k x k``
Conv2d layers with ``k > 1`` and ``groups = 1`` are decomposed; linear and 1x1 layers stay dense
(``lowrank=svd`` factorizes those).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.codecs.lowrank import lowrank_payload
from compresslab.compress.common import hide_epoch_from_selection, resolve_epoch, select_layers, set_module
from compresslab.compress.lowrank.factorized import TENSOR_MODULES, CPConv, Tucker2Conv
from compresslab.compress.quant.swap import is_swapped
from compresslab.compress.lowrank.tensor_decomp import (
    cp_factorize,
    energy_rank,
    evbmf_rank,
    factor_params,
    tucker2_factorize,
    unfold,
)
from compresslab.compress.lowrank.options import TensorOptions
from compresslab.errors import ConfigError

log = logging.getLogger(__name__)

RANK_MODES = {"tucker2": ("vbmf", "energy", "ratio"), "cp": ("vbmf", "params")}


# ---- the method --------------------------------------------------------------------------------------
class TensorLowRank(CompressionMethod):
    """``lowrank=tucker`` / ``lowrank=cp`` (see the module docstring)."""

    options = TensorOptions

    def __init__(self, name: str, decomposition: str = "tucker2", rank_mode: str = "vbmf",
                 rank_ratio: float | None = None, energy: float | None = None, param_ratio: float | None = None,
                 ranks: Mapping[str, Any] | None = None, start_epoch: int = -8, min_rank: int = 1,
                 exclude: Sequence[str] = (), only_if_smaller: bool = True, n_iter_max: int = 100) -> None:
        super().__init__(name)
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
        self.rank_ratio = None if rank_ratio is None else float(rank_ratio)
        self.energy = None if energy is None else float(energy)
        self.param_ratio = None if param_ratio is None else float(param_ratio)
        self.ranks = {str(k): self._parse_rank(k, v) for k, v in dict(ranks or {}).items()}
        self.start_epoch, self.min_rank = int(start_epoch), int(min_rank)
        self.exclude, self.only_if_smaller = list(exclude or []), bool(only_if_smaller)
        self.n_iter_max = int(n_iter_max)
        self.layer_info: dict[str, dict] = {}
        self.done = False
        self._callback: TensorLowRankCallback | None = None

    def _parse_rank(self, layer: Any, value: Any):
        if self.decomposition == "tucker2":  # the ranks' types and range: TensorOptions
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ConfigError(f"lowrank.ranks.{layer}: Tucker-2 takes [rank_out, rank_in], got {value!r}")
            return [int(v) for v in value]
        if not isinstance(value, int):
            raise ConfigError(f"lowrank.ranks.{layer}: CP takes one positive integer rank, got {value!r}")
        return int(value)

    def targets(self, model: nn.Module) -> dict[str, nn.Conv2d]:
        """The ``k x k`` (k > 1), ungrouped Conv2d layers not excluded."""
        return {n: m for n, m in select_layers(model, self.exclude).items()
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
        """``start_epoch`` counted from the end when negative."""
        return resolve_epoch(self.start_epoch, max_epochs)

    @torch.no_grad()
    def decompose(self, model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        """Replace every target layer of ``model`` by its decomposition (in place); returns (old, new) pairs."""
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
            set_module(model, name, new)
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
    for name, conv in list(module.named_modules()):
        if type(conv) is not nn.Conv2d:
            continue
        base = prefix + (f"{name}." if name else "")
        if f"{base}weight" in state_dict:
            continue
        if f"{base}core.weight" in state_dict:
            r_out, r_in = state_dict[f"{base}core.weight"].shape[:2]
            set_module(module, name, Tucker2Conv(conv, int(r_out), int(r_in)).to(conv.weight.device))
        elif f"{base}pw_in.weight" in state_dict:
            set_module(module, name, CPConv(conv, int(state_dict[f"{base}pw_in.weight"].shape[0])).to(
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
