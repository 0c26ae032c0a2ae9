"""Network Slimming (Liu et al., "Learning Efficient Convolutional Networks through Network
Slimming", ICCV 2017): channel-level sparsity from an L1 penalty on the BN scaling factors.

1. Sparsity training: the loss gets ``λ Σ_γ |γ|`` over every BN scale factor; as in the authors'
   code (``updateBN``), its subgradient ``λ·sign(γ)`` is added to the BN weights' gradients after
   each backward pass, before the optimizer step.
2. Pruning (at ``start``): one **global** threshold — the ``ratio`` quantile of all the prunable
   channels' |γ| — and every channel whose |γ| falls below it is removed. The per-layer ratios
   therefore come out of the training instead of being set by hand. Channels are removed
   physically with torch-pruning's dependency graph (the conv's filters, the BN entries, the next
   layer's inputs); channels coupled through residual additions are one group scored by the
   mean |γ| of their BNs (the paper prunes ResNets through a channel-selection layer instead).
   ``max_layer_ratio`` keeps some channels in every layer (the paper notes that a global
   threshold can otherwise empty a layer).
3. Fine-tuning: the rest of the fit (the penalty stops at the last pruning step unless
   ``regularize_after_pruning``).

``steps: k`` > 1 is the paper's multi-pass scheme (Sec. 4): sparsity training, pruning and
fine-tuning repeated, each pass removing an equal share of the original channels.

The artifact is the same ``compresslab.structured/1`` spec + pruned state dict as ``prune=structured``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from compresslab.compress.common import matches
from compresslab.compress.prune.channels import ignored_modules
from compresslab.compress.prune.options import SlimmingOptions
from compresslab.compress.prune.structured import StructuredPruning
from compresslab.errors import ConfigError

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def bn_layers(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, _BatchNorm]:
    """Affine BatchNorm layers by name, minus the ``exclude`` patterns."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.affine and not matches(n, exclude)}


class L1BNPenalty:
    """Adds ``strength · sign(γ)`` to the gradient of every BN scale (the subgradient of
    ``strength · Σ|γ|``), as the authors' ``updateBN``."""

    def __init__(self, model: nn.Module, strength: float, exclude: Sequence[str] = ()) -> None:
        self.model = model
        self.strength = float(strength)
        self.layers = list(bn_layers(model, exclude).values())

    @torch.no_grad()
    def __call__(self) -> None:
        for bn in self.layers:
            if bn.weight.grad is not None:
                bn.weight.grad.add_(self.strength * torch.sign(bn.weight))


def slimming_plan(model: nn.Module, example: torch.Tensor, ratio: float, exclude: Sequence[str] = (),
                  max_layer_ratio: float = 0.9):
    """The dependency graph and ``[(group, channel indices to remove)]`` for one slimming step:
    the ``ratio`` fraction of all prunable channels with the smallest |γ| (global ranking),
    at most ``max_layer_ratio`` of any group's channels (ties, e.g. untrained γ = 1, broken by position)."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    scorer = tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)
    scored = []
    for group in graph.get_all_groups(ignored_layers=ignored_modules(model, exclude), root_module_types=ROOT_TYPES):
        score = scorer(group)
        if score is not None:  # groups without a BN have no scaling factor to rank
            scored.append((group, score.detach().float().cpu()))
    if not scored:
        return graph, []
    all_scores = torch.cat([s for _, s in scored])
    k = int(float(ratio) * all_scores.numel())
    if k <= 0:
        return graph, []
    chosen = torch.zeros(all_scores.numel(), dtype=torch.bool)
    chosen[torch.argsort(all_scores, stable=True)[:k]] = True  # exactly k channels, ties broken by position
    plan, offset = [], 0
    for group, score in scored:
        idxs = torch.nonzero(chosen[offset: offset + score.numel()]).view(-1)
        offset += score.numel()
        cap = min(int(max_layer_ratio * score.numel()), score.numel() - 1)
        if idxs.numel() > cap:  # keep the largest-|γ| ones of this group
            idxs = idxs[torch.argsort(score[idxs])[:cap]]
        if idxs.numel():
            plan.append((group, sorted(int(i) for i in idxs)))
    return graph, plan


def slim_channels(model: nn.Module, example: torch.Tensor, ratio: float, exclude: Sequence[str] = (),
                  max_layer_ratio: float = 0.9) -> dict[str, int]:
    """One slimming step in place (traced in eval mode); returns {root layer name: channels removed}."""
    was_training = model.training
    model.eval()
    names = {m: n for n, m in model.named_modules()}
    removed = {}
    try:
        graph, plan = slimming_plan(model, example, ratio, exclude, max_layer_ratio)
        for group, idxs in plan:
            root, handler = group[0].dep.target.module, group[0].dep.handler
            graph.get_pruning_group(root, handler, idxs).prune()
            removed[names.get(root, "?")] = len(idxs)
    finally:
        model.train(was_training)
    return removed


class NetworkSlimming(StructuredPruning):
    """``prune=slimming``: L1 on BN scales, global |γ| threshold, channel removal, fine-tuning
    (see the module docstring). ``ratio``: fraction of the prunable channels removed (the
    paper's "percent"); ``strength``: λ; ``start``: the pruning epoch (sparsity training before it)."""

    options = SlimmingOptions

    def __init__(self, name: str, ratio: float = 0.5, strength: float = 1e-4, regularize_after_pruning: bool = False,
                 steps: int = 1, start: int = 8, end: int | None = None, unit: str = "epoch",
                 exclude: Sequence[str] = (), max_layer_ratio: float = 0.9, select_after_pruning: bool = True,
                 epochs: int | None = None) -> None:
        super().__init__(name, ratio=ratio, importance="bn_scale", scope="global", steps=steps, start=start, end=end,
                         unit=unit, exclude=exclude, max_layer_ratio=max_layer_ratio,
                         select_after_pruning=select_after_pruning, epochs=epochs)
        self.strength = float(strength)
        self.regularize_after_pruning = bool(regularize_after_pruning)
        self.removed: list[dict[str, int]] = []

    def validate_student(self, student: nn.Module, datamodule) -> None:
        if not bn_layers(student, self.exclude):
            raise ConfigError(f"prune={self.name} ranks channels by their BatchNorm scale factors, and the student "
                              f"({type(student).__name__}) has no affine BatchNorm layer; use a BN network (resnet20, "
                              "vgg8, wrn_16_2, ...) or prune=structured with another importance")

    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        self.validate_student(student, datamodule)
        return super().prepare(student, datamodule)

    def prune_step(self, model: nn.Module, example: torch.Tensor, ratio: float, batches: Sequence) -> None:
        self.removed.append(slim_channels(model, example, ratio, self.exclude, self.max_layer_ratio))

    def regularizes(self) -> bool:
        return self.strength > 0

    def regularize_now(self, schedule_done: bool) -> bool:
        return not schedule_done or self.regularize_after_pruning

    def make_regularizer(self, model: nn.Module, example: torch.Tensor):
        return L1BNPenalty(model, self.strength, self.exclude)

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        student = super().finalize(student, datamodule)
        gammas = torch.cat([bn.weight.detach().abs().flatten().cpu() for bn in bn_layers(student).values()])
        self._report.update({"importance": "bn_scale (global threshold)", "slimming_strength": self.strength,
                             "slimming_bn_abs_gamma_median": float(gammas.median()) if gammas.numel() else None})
        return student

    def report(self) -> dict[str, Any]:
        return dict(self._report)


__all__ = ["NetworkSlimming", "L1BNPenalty", "slim_channels", "slimming_plan", "bn_layers"]
