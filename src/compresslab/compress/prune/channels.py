"""One channel-pruning step with Torch-Pruning's dependency graph (Fang et al., "DepGraph: Towards
Any Structural Pruning", CVPR 2023), the importance criteria, and DepGraph's group-norm
regularizer: the algorithm of ``prune=structured`` (:mod:`compresslab.compress.prune.structured`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.compress.common import classifier_name, matches
from compresslab.errors import ConfigError

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor", "hessian", "lamp", "random", "group_norm")
#: importances scored from gradients of training batches
GRADIENT_IMPORTANCES = ("taylor", "hessian")


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="first")
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="first")
    if kind == "bn_scale":
        return tp.importance.BNScaleImportance()
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    if kind == "hessian":
        return tp.importance.GroupHessianImportance()
    if kind == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if kind == "random":
        return tp.importance.RandomImportance()
    if kind == "group_norm":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    raise ConfigError(f"prune.importance must be one of {IMPORTANCES}, got {kind!r}")


def ignored_modules(model: nn.Module, exclude: Sequence[str] = ()) -> list[nn.Module]:
    """The classifier, every module whose name matches an ``exclude`` pattern, and the layers the
    model itself asks to keep (``channel_pruning_ignored()``, e.g. a ViT's residual-stream writers)."""
    head = classifier_name(model)
    kept = getattr(model, "channel_pruning_ignored", None)
    own = {id(m) for m in kept()} if callable(kept) else set()
    return [m for n, m in model.named_modules() if n and (n == head or matches(n, exclude) or id(m) in own)]


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float,
    importance: str = "l1",
    scope: str = "layer",
    exclude: Sequence[str] = (),
    max_layer_ratio: float = 0.9,
    round_to: int | None = None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> nn.Module:
    """Remove the ``ratio`` fraction of channels of ``model`` (in place) with torch-pruning.

    ``batches`` feed the gradient importances: ``taylor`` (gradient of the summed cross-entropy)
    and ``hessian`` (per-sample squared gradients, their mean put in ``.grad``: the empirical
    Fisher diagonal). BN is in eval mode while scoring; the model is traced in eval mode, so BN
    statistics do not change.
    """
    import torch_pruning as tp

    if ratio <= 0:
        return model
    was_training = model.training
    model.eval()
    try:
        if importance in GRADIENT_IMPORTANCES:
            if not batches:
                raise ConfigError(f"prune.importance={importance} needs training batches")
            if importance == "taylor":
                model.zero_grad(set_to_none=True)
                for x, y in batches:
                    F.cross_entropy(model(x), y).backward()
            else:
                fisher_diagonal(model, batches)
        pruner = tp.pruner.MetaPruner(
            model, example, importance=_importance(importance), global_pruning=scope == "global",
            pruning_ratio=float(ratio), max_pruning_ratio=float(max_layer_ratio),
            ignored_layers=ignored_modules(model, exclude), round_to=round_to, iterative_steps=1,
        )
        pruner.step()
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    return model


def fisher_diagonal(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Put ``mean_n (∂L_n/∂θ)^2`` over the single samples of ``batches`` in every parameter's
    ``.grad`` (the empirical-Fisher approximation of the Hessian diagonal used by OBD scores);
    returns the number of samples. (torch-pruning's ``accumulate_grad`` keys its running sums
    inconsistently in 1.6 and keeps only the last sample, so the sum is taken here.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    n = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.detach() ** 2)
            n += 1
    for p, a in zip(params, acc):
        p.grad = a / max(1, n)
    return n


class GroupNormRegularizer:
    """DepGraph's group-level sparse training (Fang et al. 2023, Sec. 3.3), through torch-pruning's
    ``GroupNormPruner.regularize``: after a backward pass, ``grad += reg · γ_k · w`` on every weight of
    each coupled group, ``γ_k = 2^(alpha (I_max − I_k)/(I_max − I_min))`` with ``I_k`` the square root
    of the group's (mean-normalized) group norm. Rebuilt after each pruning step (new shapes)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, reg: float, alpha: float,
                 exclude: Sequence[str] = ()) -> None:
        import torch_pruning as tp

        self.model, self.alpha = model, float(alpha)
        was_training = model.training
        model.eval()
        try:
            self.pruner = tp.pruner.GroupNormPruner(model, example, importance=_importance("group_norm"),
                                                    reg=float(reg), ignored_layers=ignored_modules(model, exclude))
        finally:
            model.train(was_training)

    def __call__(self) -> None:
        self.pruner.regularize(self.model, alpha=2.0 ** self.alpha)


def cumulative_ratios(ratio: float, steps: int) -> list[float]:
    """Fraction of the original channels removed after each of ``steps`` equal steps."""
    return [ratio * (i + 1) / steps for i in range(steps)]


def step_ratio(cumulative: Sequence[float], i: int) -> float:
    """Ratio of the *current* channels to remove at step ``i`` to reach ``cumulative[i]``."""
    prev = cumulative[i - 1] if i > 0 else 0.0
    return 1.0 - (1.0 - cumulative[i]) / (1.0 - prev)
