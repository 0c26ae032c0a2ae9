"""Low-rank factorization by truncated SVD (``lowrank=svd``).

- Linear ``W (out x in)``: ``W ~ U_r S_r V_r^T`` becomes two layers
  ``in -> r`` (``sqrt(S_r) V_r^T``) and ``r -> out`` (``U_r sqrt(S_r)``, with the bias)
  (Denton et al., "Exploiting Linear Structure Within Convolutional Networks", NeurIPS 2014;
  Xue et al., Interspeech 2013).
- Conv, ``conv_mode=channel``: ``W`` reshaped to ``out x (in*kh*kw)`` is factorized into a
  ``k x k`` conv with ``r`` filters followed by a ``1 x 1`` conv (the channel decomposition of
  Zhang et al., "Accelerating Very Deep Convolutional Networks", TPAMI 2016).
- Conv2d, ``conv_mode=spatial``: ``W`` arranged as ``(in*kh) x (out*kw)`` is factorized into
  a ``kh x 1`` conv with ``r`` filters and a ``1 x kw`` conv (Jaderberg, Vedaldi & Zisserman,
  "Speeding up Convolutional Neural Networks with Low Rank Expansions", BMVC 2014, scheme 2).

At full rank both factorizations reproduce the layer exactly (up to float rounding).
The rank of each layer is ``rank_ratio`` of its full rank or the smallest rank keeping
``energy`` of the squared singular values; a layer is left dense when the factorization
would not reduce its parameters. ``when=before`` factorizes the freshly built student
(it is trained factorized); ``when=after`` trains dense and factorizes the trained weights
at ``start_epoch`` (negative: counted from the end), the remaining epochs fine-tuning the
factors (with KD when ``distill`` is set, since the pipeline's training module is used).
The factorized layers are :mod:`compresslab.compress.lowrank.factorized`; the artifact
(:mod:`compresslab.compress.codecs.lowrank`) stores the arch spec, the factorization plan
(per-layer kind and rank) and the state dict, and rebuilds the factorized model before
``load_state_dict``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.codecs.lowrank import lowrank_payload
from compresslab.compress.common import hide_epoch_from_selection, resolve_epoch, select_layers, set_module
from compresslab.compress.lowrank.factorized import build_svd_factors
from compresslab.compress.lowrank.options import SVDOptions
from compresslab.errors import ConfigError


# ---- SVD ---------------------------------------------------------------------------------
def weight_matrix(module: nn.Module, kind: str) -> torch.Tensor:
    """The matrix whose SVD gives the factorization of ``module`` for ``kind``."""
    w = module.weight.detach().float()
    if kind == "linear":
        return w
    if kind == "conv_channel":
        return w.reshape(w.shape[0], -1)
    out_c, in_c, kh, kw = w.shape  # M[(i, y), (o, x)] = W[o, i, y, x]
    return w.permute(1, 2, 0, 3).reshape(in_c * kh, out_c * kw)


def full_rank(module: nn.Module, kind: str) -> int:
    """min of the factorized matrix's dimensions."""
    w = module.weight
    if kind == "linear":
        return min(w.shape[0], w.shape[1])
    if kind == "conv_channel":
        return min(w.shape[0], w[0].numel())
    out_c, in_c, kh, kw = w.shape
    return min(in_c * kh, out_c * kw)


def factor_params(module: nn.Module, kind: str, rank: int) -> int:
    """Weights of the factorized layer at ``rank`` (biases excluded)."""
    w = module.weight
    if kind == "linear":
        return rank * (w.shape[0] + w.shape[1])
    if kind == "conv_channel":
        return rank * (w[0].numel() + w.shape[0])
    out_c, in_c, kh, kw = w.shape
    return rank * (in_c * kh + out_c * kw)


def layer_kind(module: nn.Module, conv_mode: str) -> str | None:
    """How ``module`` is factorized, or None when it cannot be (grouped convs, 1-D spatial)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or module.padding_mode != "zeros":
            return None
        if conv_mode == "spatial" and isinstance(module, nn.Conv2d) and min(module.kernel_size) > 1:
            return "conv_spatial"
        return "conv_channel"
    return None


def choose_rank(singular: torch.Tensor, full: int, rank_ratio: float | None, energy: float | None,
                min_rank: int = 1) -> int:
    """Rank from a ratio of the full rank, or the smallest rank keeping ``energy`` of sum(S^2)."""
    if energy is not None:
        e = singular.double() ** 2
        cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
        r = int(torch.searchsorted(cum, torch.tensor(float(energy), dtype=cum.dtype)).item()) + 1
    else:
        r = int(round(float(rank_ratio) * full))
    return max(int(min_rank), min(full, r))


@torch.no_grad()
def factorize(module: nn.Module, kind: str, rank: int) -> nn.Module:
    """The factorized replacement of ``module`` at ``rank`` (truncated SVD, sqrt(S) split evenly)."""
    mat = weight_matrix(module, kind)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = int(rank)
    root = s[:r].sqrt()
    left = u[:, :r] * root            # (rows, r)
    right = root[:, None] * vh[:r]     # (r, cols)
    bias = module.bias.detach().clone() if module.bias is not None else None
    new = build_svd_factors(module, kind, r)
    if kind == "linear":
        new.first.weight.copy_(right)
        new.second.weight.copy_(left)
    elif kind == "conv_channel":
        new.first.weight.copy_(right.reshape(r, *module.weight.shape[1:]))
        new.second.weight.copy_(left.reshape(module.weight.shape[0], r, *([1] * (module.weight.dim() - 2))))
    else:
        out_c, in_c, kh, kw = module.weight.shape
        # left rows are (i, y): first[r, i, y, 0]; right columns are (o, x): second[o, r, 0, x]
        new.first.weight.copy_(left.reshape(in_c, kh, r).permute(2, 0, 1).unsqueeze(-1))
        new.second.weight.copy_(right.reshape(r, out_c, kw).permute(1, 0, 2).unsqueeze(2))
    if bias is not None:
        new.second.bias.copy_(bias)
    new.to(module.weight.device, module.weight.dtype)
    return new.train(module.training)


def singular_values(module: nn.Module, kind: str) -> torch.Tensor:
    """Singular values of the layer's factorized matrix."""
    return torch.linalg.svdvals(weight_matrix(module, kind))


# ---- deferred factorization (when=after) ---------------------------------------------------
class DeferredLowRank(nn.Module):
    """A layer that computes densely until :meth:`switch`, then as full-size SVD factors whose
    components beyond ``rank`` are masked (so parameter shapes, the optimizer and checkpoint
    keys never change during the fit); :meth:`compact` gives the real factorized module."""

    def __init__(self, dense: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.dense = dense
        full = full_rank(dense, kind)
        self.factors = factorize(dense, kind, full)  # placeholder values until switch()
        self.register_buffer("rank_mask", torch.ones(full))
        self.register_buffer("active", torch.zeros((), dtype=torch.int64))

    @property
    def rank(self) -> int:
        return int(self.rank_mask.sum())

    def forward(self, x):
        if not bool(self.active):
            return self.dense(x)
        mid = self.factors.first(x)
        mask = self.rank_mask if self.kind == "linear" else self.rank_mask.view(1, -1, *([1] * (mid.dim() - 2)))
        return self.factors.second(mid * mask)

    @torch.no_grad()
    def switch(self, rank: int) -> None:
        """Factorize the dense weights now; keep the top ``rank`` components."""
        fresh = factorize(self.dense, self.kind, full_rank(self.dense, self.kind))
        self.factors.load_state_dict(fresh.state_dict())
        self.rank_mask.zero_()[: int(rank)] = 1
        self.active.fill_(1)
        for p in self.dense.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def compact(self) -> nn.Module:
        """The factorized module at the masked rank (exactly what :meth:`forward` computes)."""
        r = self.rank
        f = self.factors
        new = build_svd_factors(self.dense, self.kind, r)
        new.first.weight.copy_(f.first.weight[:r])
        new.second.weight.copy_(f.second.weight[:, :r])
        if f.second.bias is not None:
            new.second.bias.copy_(f.second.bias)
        return new.to(f.second.weight.device).train(self.training)


# ---- the method --------------------------------------------------------------------------
class SVDLowRank(CompressionMethod):
    """Truncated-SVD factorization of linear and conv layers (``lowrank=svd``)."""

    options = SVDOptions

    def __init__(self, name: str, rank_ratio: float | None = 0.5, energy: float | None = None,
                 conv_mode: str = "channel", when: str = "before", start_epoch: int = -8, min_rank: int = 1,
                 exclude: Sequence[str] = (), keep_first_last: bool = False, only_if_smaller: bool = True) -> None:
        super().__init__(name)
        if energy is None and rank_ratio is None:
            raise ConfigError("lowrank: set rank_ratio or energy")
        self.rank_ratio = None if rank_ratio is None else float(rank_ratio)
        self.energy = None if energy is None else float(energy)
        self.conv_mode, self.when = conv_mode, when
        self.start_epoch, self.min_rank = int(start_epoch), int(min_rank)
        self.exclude, self.keep_first_last = list(exclude), bool(keep_first_last)
        self.only_if_smaller = bool(only_if_smaller)
        self.layer_info: dict[str, dict] = {}
        self.finetuned = False

    def resolve_start(self, max_epochs: int) -> int:
        """``start_epoch`` counted from the end when negative."""
        return resolve_epoch(self.start_epoch, max_epochs)

    def plan_layer(self, name: str, module: nn.Module, kind: str) -> int | None:
        """Chosen rank of a layer from its current weights (None: keep it dense), recorded for report()."""
        s = singular_values(module, kind)
        full = full_rank(module, kind)
        rank = choose_rank(s, full, self.rank_ratio, self.energy, self.min_rank)
        dense_params = module.weight.numel()
        new_params = factor_params(module, kind, rank)
        e = s.double() ** 2
        info = {"kind": kind, "rank": rank, "full_rank": full, "energy_kept": float(e[:rank].sum() / e.sum())
                if float(e.sum()) > 0 else 1.0, "params_dense": int(dense_params), "params_factorized": int(new_params)}
        if self.only_if_smaller and new_params >= dense_params:
            info.update(rank=None, params_factorized=int(dense_params), note="kept dense (no saving)")
            self.layer_info[name] = info
            return None
        self.layer_info[name] = info
        return rank

    def targets(self, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        """Layers that can be factorized, with their kind."""
        out = {}
        for name, module in select_layers(model, self.exclude, keep_first_last=self.keep_first_last).items():
            kind = layer_kind(module, self.conv_mode)
            if kind is not None:
                out[name] = (module, kind)
        return out

    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        targets = self.targets(student)
        if not targets:
            raise ConfigError(f"lowrank={self.name}: the student has no layer that can be factorized")
        for name, (module, kind) in targets.items():
            if self.when == "before":
                rank = self.plan_layer(name, module, kind)
                if rank is not None:
                    set_module(student, name, factorize(module, kind, rank))
            else:
                set_module(student, name, DeferredLowRank(module, kind))
        return student

    def switch(self, model: nn.Module) -> None:
        """Factorize the deferred layers from their current (trained) weights."""
        for name, module in model.named_modules():
            if isinstance(module, DeferredLowRank) and not bool(module.active):
                rank = self.plan_layer(name, module.dense, module.kind)
                if rank is not None:
                    module.switch(rank)

    def callbacks(self) -> list[Callback]:
        return [LowRankCallback(self)] if self.when == "after" else []

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        for name, module in list(student.named_modules()):
            if not isinstance(module, DeferredLowRank):
                continue
            if bool(module.active):
                self.finetuned = True
                info = self.layer_info.get(name)
                if info is None or info.get("rank") != module.rank:  # e.g. resumed: recompute the record
                    self.plan_layer(name, module.dense, module.kind)
                    self.layer_info[name]["rank"] = module.rank
                    self.layer_info[name]["params_factorized"] = factor_params(module.dense, module.kind,
                                                                               module.rank)
                set_module(student, name, module.compact())
            else:  # never switched during the fit: factorize the final weights (no fine-tuning)
                rank = self.plan_layer(name, module.dense, module.kind)
                set_module(student, name, module.dense if rank is None else factorize(module.dense, module.kind, rank))
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict:
        return lowrank_payload(student, context)

    def report(self) -> dict[str, Any]:
        factorized = {n: i for n, i in self.layer_info.items() if i.get("rank") is not None}
        dense = sum(i["params_dense"] for i in self.layer_info.values())
        after = sum(i["params_factorized"] for i in self.layer_info.values())
        return {
            "lowrank_ranks": {n: i["rank"] for n, i in factorized.items()},
            "lowrank_full_ranks": {n: i["full_rank"] for n, i in self.layer_info.items()},
            "lowrank_energy_kept": {n: round(i["energy_kept"], 6) for n, i in factorized.items()},
            "lowrank_kept_dense": sorted(n for n, i in self.layer_info.items() if i.get("rank") is None),
            "lowrank_layer_params_before": int(dense),
            "lowrank_layer_params_after": int(after),
            "lowrank_when": self.when,
            "lowrank_finetuned": self.finetuned if self.when == "after" else True,
        }


class LowRankCallback(Callback):
    """Factorizes at ``start_epoch`` (``when=after``); earlier epochs are not eligible as the
    val-selected checkpoint."""

    def __init__(self, method: SVDLowRank) -> None:
        self.method = method

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= self.method.resolve_start(trainer.max_epochs):
            self.method.switch(pl_module.model)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.method.resolve_start(trainer.max_epochs):
            hide_epoch_from_selection(trainer)
