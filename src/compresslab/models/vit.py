"""Small Vision Transformers (Dosovitskiy et al. 2021) and DeiT (Touvron et al. 2021) for
8×8 digits, 28×28 MNIST and 32×32 CIFAR.

Built on torchvision's ``VisionTransformer`` (patch embedding, encoder blocks, class token,
heads, its initialisation) rather than written by hand. Why torchvision and not timm: torchvision
is already a dependency (timm is not installed), and its blocks use ``nn.MultiheadAttention``,
the same module ``student=torchvision student.arch.name=vit_b_16`` builds; one conversion
(:func:`~compresslab.models.attention.explicit_attention`, which turns it into explicit
q/k/v/out Linears) therefore makes every compression method reach attention in both.

:class:`ViT` is ``student=vit_tiny`` / ``teacher=vit_small``; :class:`DeiT` is
``student=deit_tiny``: a ViT with a distillation token beside the class token and a second
head ``head_dist`` on it; at inference (and in every forward) the two heads' logits are averaged,
as the paper does at test time. ``distill=deit`` (:mod:`compresslab.distill.deit`) reads the two
heads separately during training through forward taps on ``heads`` and ``head_dist``.
Random init; nothing is downloaded.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from compresslab.errors import ConfigError
from compresslab.models.attention import explicit_attention
from compresslab.models.common import require_image_input

__all__ = ["ViT", "DeiT", "default_patch_size"]

#: Patch size per image side when ``patch_size`` is not given: 8×8 digits -> 2 (16 tokens),
#: 28×28 MNIST -> 4 (49 tokens), 32×32 CIFAR -> 4 (64 tokens, as the CIFAR ViT literature).
DEFAULT_PATCH = {8: 2, 28: 4, 32: 4}


def default_patch_size(side: int) -> int:
    """The patch size for square images of ``side`` pixels: :data:`DEFAULT_PATCH`, else the
    smallest divisor of ``side`` that gives at most 64 patches."""
    if side in DEFAULT_PATCH:
        return DEFAULT_PATCH[side]
    return next(p for p in range(1, side + 1) if side % p == 0 and (side // p) ** 2 <= 64)


class ViT(VisionTransformer):
    """torchvision's ``VisionTransformer`` for ``input_shape`` images with C channels: the patch
    embedding takes C channels and attention is :class:`~compresslab.models.attention.ExplicitAttention`."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, patch_size: int | None = None,
                 depth: int = 4, heads: int = 4, width: int = 64, mlp_ratio: float = 2.0,
                 dropout: float = 0.0, attention_dropout: float = 0.0) -> None:
        c, h, w = require_image_input(type(self).__name__, input_shape)
        if h != w:
            raise ConfigError(f"{type(self).__name__} needs square images, the dataset gives {h}x{w}.")
        patch = int(patch_size) if patch_size is not None else default_patch_size(h)
        if patch < 1 or h % patch:
            raise ConfigError(f"arch.patch_size={patch_size} does not divide the image side {h}; pick a divisor "
                              f"of {h} (or patch_size: null for the default {default_patch_size(h)}).")
        if int(width) % int(heads):
            raise ConfigError(f"arch.width={width} is not divisible by arch.heads={heads}.")
        super().__init__(image_size=h, patch_size=patch, num_layers=int(depth), num_heads=int(heads),
                         hidden_dim=int(width), mlp_dim=int(round(width * mlp_ratio)), dropout=dropout,
                         attention_dropout=attention_dropout, num_classes=int(num_classes))
        if c != 3:  # torchvision's stem takes RGB; same init (truncated normal, std sqrt(1/fan_in))
            self.conv_proj = nn.Conv2d(c, int(width), kernel_size=patch, stride=patch)
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (c * patch * patch)))
            nn.init.zeros_(self.conv_proj.bias)
        # torchvision zero-initialises the head; timm/DeiT draw it like every Linear (truncated normal,
        # std 0.02). Exact zeros would read as pruned weights to weight sharing and the sparse codecs.
        nn.init.trunc_normal_(self.heads.head.weight, std=0.02)
        explicit_attention(self)

    def channel_pruning_ignored(self) -> list[nn.Module]:
        """Layers whose output channels ``prune=structured`` keeps (read by its ``ignored_modules``):
        the residual stream's writers (patch embedding, attention output, MLP output), whose width the
        class/distillation tokens and the position embedding share outside any module, the q/k/v
        projections, whose widths are whole heads (``prune=heads`` removes those), and the heads.
        Channel pruning therefore narrows the MLP hidden layers."""
        keep: list[nn.Module] = [self.conv_proj, self.heads]
        for block in self.encoder.layers:
            attn = block.self_attention
            keep += [attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, block.mlp[-2]]
        head_dist = getattr(self, "head_dist", None)
        return keep + ([head_dist] if head_dist is not None else [])


class DeiT(ViT):
    """A ViT with DeiT's distillation token (Touvron et al. 2021, §4): a second learned token
    beside the class token, its own position embedding, and a second head ``head_dist`` on its
    output. ``forward`` returns the average of the class head's and the distillation head's
    logits (the paper's inference rule)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, **kwargs) -> None:
        super().__init__(input_shape, num_classes, **kwargs)
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        pos = self.encoder.pos_embedding
        self.encoder.pos_embedding = nn.Parameter(torch.empty(1, pos.shape[1] + 1, self.hidden_dim).normal_(std=0.02))
        self.seq_length += 1
        self.head_dist = nn.Linear(self.hidden_dim, int(num_classes))
        nn.init.trunc_normal_(self.head_dist.weight, std=0.02)
        nn.init.zeros_(self.head_dist.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        x = torch.cat([self.class_token.expand(n, -1, -1), self.dist_token.expand(n, -1, -1), x], dim=1)
        x = self.encoder(x)
        return (self.heads(x[:, 0]) + self.head_dist(x[:, 1])) / 2

