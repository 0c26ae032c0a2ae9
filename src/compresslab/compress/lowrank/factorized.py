"""The factorized layers of the low-rank methods and their plain-data plan.

- ``lowrank=svd`` (:mod:`compresslab.compress.lowrank.svd`): :class:`LowRankLinear`,
  :class:`LowRankConv` (channel decomposition) and :class:`LowRankSpatialConv2d` (spatial
  decomposition), two layers each.
- ``lowrank=tucker`` / ``lowrank=cp`` (:mod:`compresslab.compress.lowrank.tucker_cp`):
  :class:`Tucker2Conv` (three layers) and :class:`CPConv` (four layers).

:func:`lowrank_plan` describes the factorized layers of a model as ``{layer: {"kind", "rank"}}``;
:func:`apply_plan` rebuilds those layers (uninitialised, for ``load_state_dict``) in a freshly
built model. Every artifact format stores the plan, so each composes with ``lowrank``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from compresslab.compress.common import set_module
from compresslab.errors import CheckpointError, ConfigError

KINDS = ("linear", "conv_channel", "conv_spatial")
TENSOR_KINDS = ("tucker2", "cp")


# ---- truncated SVD: two layers -----------------------------------------------------------
class _TwoLayers(nn.Module):
    """``second(first(x))``."""

    def forward(self, x):
        return self.second(self.first(x))


class LowRankLinear(_TwoLayers):
    """``second(first(x))``: Linear(in, rank, no bias) then Linear(rank, out, bias)."""

    kind = "linear"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.rank = int(rank)
        self.first = nn.Linear(in_features, self.rank, bias=False)
        self.second = nn.Linear(self.rank, out_features, bias=bias)


class LowRankConv(_TwoLayers):
    """Channel decomposition: ConvNd(in, rank, k, stride, padding, dilation) then ConvNd(rank, out, 1)."""

    kind = "conv_channel"

    def __init__(self, conv: nn.Module, rank: int) -> None:
        super().__init__()
        cls = type(conv) if type(conv) in (nn.Conv1d, nn.Conv2d) else _conv_base(conv)
        self.rank = int(rank)
        self.first = cls(conv.in_channels, self.rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode)
        self.second = cls(self.rank, conv.out_channels, 1, bias=conv.bias is not None)


class LowRankSpatialConv2d(_TwoLayers):
    """Spatial decomposition (Jaderberg et al. 2014): Conv2d(in, rank, (kh, 1)) then Conv2d(rank, out, (1, kw))."""

    kind = "conv_spatial"

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        self.rank = int(rank)
        self.first = nn.Conv2d(conv.in_channels, self.rank, (kh, 1), stride=(sh, 1), padding=(ph, 0),
                               dilation=(dh, 1), bias=False)
        self.second = nn.Conv2d(self.rank, conv.out_channels, (1, kw), stride=(1, sw), padding=(0, pw),
                                dilation=(1, dw), bias=conv.bias is not None)


LOWRANK_MODULES = (LowRankLinear, LowRankConv, LowRankSpatialConv2d)


def _conv_base(conv: nn.Module) -> type:
    for cls in (nn.Conv2d, nn.Conv1d):
        if isinstance(conv, cls):
            return cls
    raise ConfigError(f"cannot factorize {type(conv).__name__}")


def build_svd_factors(module: nn.Module, kind: str, rank: int) -> nn.Module:
    """An (uninitialised) SVD-factorized module of ``kind`` with ``rank`` for ``module``."""
    if kind == "linear":
        return LowRankLinear(module.in_features, module.out_features, rank, module.bias is not None)
    if kind == "conv_channel":
        return LowRankConv(module, rank)
    return LowRankSpatialConv2d(module, rank)


# ---- tensor decompositions of conv kernels ------------------------------------------------------
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


# ---- the plan ------------------------------------------------------------------------------
def lowrank_plan(model: nn.Module) -> dict[str, dict]:
    """``{layer name: {"kind", "rank"}}`` of the factorized layers in ``model`` (SVD kinds and the
    Tucker-2 / CP modules; Tucker-2's rank is ``[rank_out, rank_in]``)."""
    return {n: {"kind": m.kind, "rank": [int(v) for v in m.rank] if isinstance(m.rank, list) else int(m.rank)}
            for n, m in model.named_modules() if isinstance(m, LOWRANK_MODULES + TENSOR_MODULES)}


def apply_plan(model: nn.Module, plan: dict[str, dict]) -> nn.Module:
    """Replace the planned layers of a freshly built ``model`` by factorized modules of the
    planned ranks (their weights are then loaded from a state dict)."""
    for name, spec in plan.items():
        kind = spec["kind"]
        if kind not in KINDS + TENSOR_KINDS:
            raise CheckpointError(f"unknown low-rank layer kind {kind!r} for {name}")
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"low-rank plan names {name}, which the architecture does not have") from exc
        if kind in TENSOR_KINDS:
            if type(module) is not nn.Conv2d:
                raise CheckpointError(f"low-rank plan: {name} is a {type(module).__name__}, not the Conv2d {kind} needs")
            set_module(model, name, build_factorized(module, kind, spec["rank"]))
            continue
        set_module(model, name, build_svd_factors(module, kind, int(spec["rank"])))
    return model
