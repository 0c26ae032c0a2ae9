"""``prune=heads``: attention-head pruning that removes heads physically (Michel, Levy & Neubig,
"Are Sixteen Heads Really Better than One?", NeurIPS 2019).

Importance of head h (``prune.importance``):

- ``gradient`` — Michel et al.'s I_h = E_x |∂L(x)/∂ξ_h|: a mask ξ (all ones) multiplies each head's
  output before the output projection, and the absolute gradient of the loss on training batches
  is accumulated per batch (as their code does); scores are normalized per layer by their ℓ2 norm
  (their §4.2) before a ``global`` ranking;
- ``magnitude`` — the ℓ2 norm of the head's q/k/v rows and out-projection columns;
- ``random`` — a seeded random ranking (the control of the ``michel_heads`` reproduction).

A head is removed from :class:`~compresslab.models.attention.ExplicitAttention` (any module with
``num_heads`` and ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears) by Torch-Pruning's
Linear pruning functions: its ``head_dim`` rows of q/k/v and columns of ``out_proj`` go, and
``num_heads`` drops (Torch-Pruning's own head-pruning path in ``MetaPruner`` expects one fused
qkv Linear or HF-style modules and ranks by its channel importances, so the ranking is ours and
only the surgery is Torch-Pruning's). ``scope=layer`` removes the same share in every block;
``global`` ranks all heads together, keeping at least one per block.

When: ``start`` (in ``unit``) during training, then fine-tuning (``steps`` > 1: several steps,
as ``prune=structured``); ``start: null`` prunes the trained model at the end, with no
retraining (Michel et al.'s setting). The schedule, optimizer rewiring, checkpoint resize and the
artifact (arch spec + pruned state dict, ``compresslab.structured/1``; the number of heads is
restored from the q projection's width by :func:`~compresslab.compress.structure.resize_to_state_dict`)
are :mod:`compresslab.compress.prune.structured`'s.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.compress.common import matches
from compresslab.compress.prune.options import HEAD_IMPORTANCES, HeadOptions
from compresslab.compress.prune.structured import StructuredPruning
from compresslab.errors import ConfigError

_PROJ = ("q_proj", "k_proj", "v_proj")


def attention_modules(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The attention modules with explicit projections (``num_heads`` + q/k/v/out Linears), by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(getattr(m, "num_heads", None), int) and all(
                isinstance(getattr(m, p, None), nn.Linear) for p in (*_PROJ, "out_proj")) and not matches(name, exclude):
            out[name] = m
    return out


def head_dim(attn: nn.Module) -> int:
    """Width of one head: the q projection's width over the number of heads."""
    return attn.q_proj.out_features // attn.num_heads


class HeadMask:
    """Context manager: multiplies each head's output (the ``out_proj`` input, viewed as
    ``(..., heads, head_dim)``) by ``masks[name][h]``: Michel et al.'s ξ."""

    def __init__(self, attns: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
        self.attns, self.masks, self.handles = attns, masks, []

    def __enter__(self) -> "HeadMask":
        for name, attn in self.attns.items():
            mask, d = self.masks[name], head_dim(attn)

            def hook(module, args, mask=mask, d=d):
                x = args[0]
                gated = x.reshape(*x.shape[:-1], -1, d) * mask.to(x.dtype)[:, None]
                return (gated.reshape(x.shape),) + tuple(args[1:])

            self.handles.append(attn.out_proj.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def gradient_importance(model: nn.Module, attns: dict[str, nn.Module], batches: Sequence) -> dict[str, torch.Tensor]:
    """Michel et al.'s I_h = Σ_batches |∂L/∂ξ_h| (cross-entropy on ``batches`` of (x, y))."""
    if not batches:
        raise ConfigError("prune.importance=gradient needs training batches (prune.taylor_batches >= 1)")
    device = next(model.parameters()).device
    masks = {n: torch.ones(a.num_heads, device=device, requires_grad=True) for n, a in attns.items()}
    scores = {n: torch.zeros(a.num_heads) for n, a in attns.items()}
    was_training = model.training
    model.eval()  # no dropout while scoring
    with HeadMask(attns, masks), torch.enable_grad():
        for x, y in batches:
            grads = torch.autograd.grad(F.cross_entropy(model(x.to(device)), y.to(device)), list(masks.values()))
            for name, g in zip(masks, grads):
                scores[name] += g.detach().abs().cpu()
    model.train(was_training)
    return scores


@torch.no_grad()
def magnitude_importance(attns: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """ℓ2 norm per head of its q/k/v rows and its out-projection columns."""
    out = {}
    for name, a in attns.items():
        h, d = a.num_heads, head_dim(a)
        sq = sum(getattr(a, p).weight.reshape(h, d, -1).pow(2).sum((1, 2)) for p in _PROJ)
        sq = sq + a.out_proj.weight.reshape(a.out_proj.out_features, h, d).pow(2).sum((0, 2))
        out[name] = sq.sqrt().cpu()
    return out


def head_scores(model: nn.Module, attns: dict[str, nn.Module], importance: str, batches: Sequence = (),
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-layer head importance (higher = keep), ℓ2-normalized per layer (Michel et al. §4.2)."""
    if importance == "gradient":
        raw = gradient_importance(model, attns, batches)
    elif importance == "magnitude":
        raw = magnitude_importance(attns)
    elif importance == "random":
        g = torch.Generator().manual_seed(int(seed))
        raw = {n: torch.rand(a.num_heads, generator=g) for n, a in attns.items()}
    else:
        raise ConfigError(f"prune.importance must be one of {HEAD_IMPORTANCES} for prune=heads, got {importance!r}")
    return {n: s / s.norm().clamp_min(1e-12) for n, s in raw.items()}


def heads_to_remove(scores: dict[str, torch.Tensor], ratio: float, scope: str) -> dict[str, list[int]]:
    """Head indices to remove per layer: the ``ratio`` share of lowest scores, per layer
    (``round(ratio·h)``) or over all layers (``global``), always keeping one head per layer."""
    if scope == "layer":
        out = {}
        for name, s in scores.items():
            k = min(int(round(ratio * s.numel())), s.numel() - 1)
            out[name] = sorted(torch.argsort(s, stable=True)[:k].tolist())
        return out
    ranked = sorted(((float(v), name, i) for name, s in scores.items() for i, v in enumerate(s)))
    budget = int(round(ratio * len(ranked)))
    out = {name: [] for name in scores}
    for _, name, i in ranked:
        if budget == 0:
            break
        if len(out[name]) < scores[name].numel() - 1:
            out[name].append(i)
            budget -= 1
    return {n: sorted(v) for n, v in out.items()}


@torch.no_grad()
def remove_heads(attn: nn.Module, heads: Sequence[int]) -> None:
    """Physically remove ``heads`` from ``attn`` with Torch-Pruning's Linear pruning functions."""
    import torch_pruning as tp

    if not heads:
        return
    d = head_dim(attn)
    idxs = [h * d + j for h in heads for j in range(d)]
    for p in _PROJ:
        tp.prune_linear_out_channels(getattr(attn, p), idxs)
    tp.prune_linear_in_channels(attn.out_proj, idxs)
    attn.num_heads -= len(heads)


def prune_heads(model: nn.Module, ratio: float, importance: str, scope: str = "layer", batches: Sequence = (),
                seed: int = 0, exclude: Sequence[str] = ()) -> dict[str, list[int]]:
    """Score and remove the ``ratio`` share of heads of ``model`` in place; returns the removed
    head indices per attention module (indices before removal)."""
    attns = attention_modules(model, exclude)
    if not attns:
        raise ConfigError("prune=heads: the student has no attention module with explicit q/k/v/out projections "
                          "(use student=vit_tiny / deit_tiny, or a torchvision ViT)")
    removed = heads_to_remove(head_scores(model, attns, importance, batches, seed), ratio, scope)
    for name, heads in removed.items():
        remove_heads(attns[name], heads)
    return removed


class HeadPruning(StructuredPruning):
    """Attention-head pruning (see the module docstring). ``ratio``: share of heads removed;
    ``importance``: gradient | magnitude | random; ``scope``: layer | global; ``start``: the
    pruning time (null: after training, no fine-tuning); ``seed``: the random ranking's seed;
    ``taylor_batches``: training batches scored for ``gradient``."""

    options = HeadOptions
    gradient_importances = ("gradient",)

    def __init__(self, name: str, ratio: float = 0.5, importance: str = "gradient", scope: str = "layer",
                 start: int | None = 2, seed: int = 0, **kwargs: Any) -> None:
        self.after_training = start is None
        super().__init__(name, ratio=ratio, importance=importance, scope=scope,
                         start=0 if start is None else start, **kwargs)
        self.seed = int(seed)
        self._heads_before: dict[str, int] = {}

    def prune_step(self, model: nn.Module, example: torch.Tensor, ratio: float, batches: Sequence) -> None:
        prune_heads(model, ratio, self.importance, self.scope, batches, self.seed, self.exclude)

    def channel_table(self, model: nn.Module) -> list[dict]:
        """Per attention module: heads and projection widths before/after."""
        rows = []
        for name, a in attention_modules(model).items():
            before = self._heads_before.get(name, a.num_heads)
            rows.append({"layer": name, "type": type(a).__name__, "heads_before": before, "heads_after": a.num_heads,
                         "out_before": before, "out_after": a.num_heads, "kept": a.num_heads / max(1, before),
                         "inner_width_after": a.q_proj.out_features})
        return rows

    def validate_student(self, student: nn.Module, datamodule) -> None:
        if not attention_modules(student, self.exclude):
            raise ConfigError("prune=heads: the student has no attention module with explicit q/k/v/out "
                              "projections (use student=vit_tiny / deit_tiny, or a torchvision ViT)")

    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        self._heads_before = {n: a.num_heads for n, a in attention_modules(student).items()}
        return super().prepare(student, datamodule)

    def callbacks(self):
        return [] if self.after_training else super().callbacks()

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        if self.after_training:
            batches = []
            if self.importance == "gradient":
                loader = datamodule.train_dataloader()
                batches = list(itertools.islice(loader, self.taylor_batches))
            self.prune_step(student, self.example, self.ratio, batches)
        student = super().finalize(student, datamodule)
        table = self._table
        self._report.pop("channels", None)
        self._report.update({
            "heads": {r["layer"]: [r["heads_before"], r["heads_after"]] for r in table},
            "heads_before_total": sum(r["heads_before"] for r in table),
            "heads_after_total": sum(r["heads_after"] for r in table),
            "scope": self.scope, "seed": self.seed,
            "finetuned": not self.after_training,
        })
        if self.after_training:
            self._report.update(selected_weights="val-best, pruned after training (no fine-tuning)",
                                pruning_steps_done=1, schedule_done=True)
        return student
