"""Knowledge review (ReviewKD): attention-based fusion and the hierarchical context loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.distill._maps import batchnorm, conv, pool_to
from compresslab.distill.losses import FeatureLoss
from compresslab.errors import ConfigError

__all__ = ["ReviewKDLoss", "ABF", "hcl_loss"]


class ABF(nn.Module):
    """Attention-based fusion of ReviewKD: a 1×1 conv-BN of the student's feature, fused with the
    (upsampled) residual from the deeper level by two sigmoid attention maps, then a 3×3 conv-BN
    to the teacher's channels at the teacher's spatial size."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool, nd: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(conv(nd, in_channels, mid_channels, 1, bias=False), batchnorm(nd, mid_channels))
        self.conv2 = nn.Sequential(conv(nd, mid_channels, out_channels, 3, 1, 1, bias=False),
                                   batchnorm(nd, out_channels))
        self.att_conv = nn.Sequential(conv(nd, 2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, residual=None, out_size: Sequence[int] | None = None):
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:2]
        if out_size is not None and tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def hcl_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
             levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """Hierarchical context loss: per level, MSE of the maps plus the MSE of their average pools
    to 4, 2, 1 positions per side (only sizes below the map's), weighted 1/2, 1/4, 1/8 and
    normalised by the weights' sum; summed over levels."""
    total = 0.0
    for fs, ft in zip(student, teacher):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        cnt, tot = 1.0, 1.0
        for size in levels:
            if size >= h:
                continue
            cnt /= 2.0
            shape = (size,) * (fs.dim() - 2)
            loss = loss + F.mse_loss(pool_to(fs, shape), pool_to(ft, shape)) * cnt
            tot += cnt
        total = total + loss / tot
    return total


class ReviewKDLoss(FeatureLoss):
    """Knowledge review (Chen et al. 2021, "Distilling Knowledge via Knowledge Review", CVPR).

    The student's features of every stage plus its pooled embedding (taps ``[stages,
    embedding]``) are fused from the deepest to the shallowest by attention-based fusion
    (:class:`ABF`): each level's output is compared with the teacher's feature of the same level
    (``[stages_preact, embedding]``, mdistiller's pre-ReLU teacher stages) by the hierarchical
    context loss :func:`hcl_loss`, summed over levels. The loss is ramped up linearly over
    ``warmup_epochs`` (``min(epoch/warmup, 1)``, epochs counted from 1 as mdistiller). mdistiller
    defaults: warm-up 20 epochs, middle width min(512, the student embedding's width); weight 5
    (its resnet32x4 → resnet8x4 config). Vector taps are treated as 1×1 maps.
    """

    def __init__(self, warmup_epochs: int = 20, max_mid_channels: int = 512) -> None:
        super().__init__()
        self.warmup_epochs, self.max_mid_channels = int(warmup_epochs), int(max_mid_channels)
        self.abfs = nn.ModuleList()
        self.out_sizes: list[tuple[int, ...]] = []
        self.nd = 0

    def warmup_factor(self, epoch: int) -> float:
        """Linear warm-up factor for (0-based) ``epoch``."""
        return 1.0 if self.warmup_epochs <= 0 else min((int(epoch) + 1) / self.warmup_epochs, 1.0)

    def build(self, student_shapes, teacher_shapes, num_samples):
        if len(self.abfs):
            return
        maps = [len(s) - 1 for s in list(student_shapes) + list(teacher_shapes) if len(s) > 1]
        if not maps or len(set(maps)) != 1 or maps[0] > 3:
            raise ConfigError("reviewkd: needs feature maps of one kind (1-D or 2-D) at its taps, got student "
                              f"{[tuple(s) for s in student_shapes]}, teacher {[tuple(t) for t in teacher_shapes]}")
        self.nd = maps[0]
        as_map = lambda s: tuple(s) if len(s) > 1 else (s[0],) + (1,) * self.nd  # noqa: E731
        s_shapes, t_shapes = [as_map(s) for s in student_shapes], [as_map(t) for t in teacher_shapes]
        mid = min(self.max_mid_channels, s_shapes[-1][0])
        n = len(s_shapes)
        for i, (s, t) in enumerate(zip(s_shapes, t_shapes)):
            self.abfs.append(ABF(s[0], mid, t[0], fuse=i < n - 1, nd=self.nd))
        self.out_sizes = [t[1:] for t in t_shapes]

    def _as_map(self, f: torch.Tensor) -> torch.Tensor:
        return f.reshape(*f.shape, *([1] * self.nd)) if f.dim() == 2 else f

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        xs = [self._as_map(s) for s in student]
        results = [None] * len(xs)
        out, residual = self.abfs[-1](xs[-1], out_size=self.out_sizes[-1])
        results[-1] = out
        for i in range(len(xs) - 2, -1, -1):
            out, residual = self.abfs[i](xs[i], residual, out_size=self.out_sizes[i])
            results[i] = out
        targets = [self._as_map(t.detach()) for t in teacher]
        return self.warmup_factor(epoch) * hcl_loss(results, targets)
