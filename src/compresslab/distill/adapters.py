"""The learnable adapters that map a student feature to the teacher feature's shape (FitNets' regressor)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.errors import ConfigError

__all__ = ["FeatureAdapter", "make_adapter"]


class FeatureAdapter(nn.Module):
    """Learnable map from a student feature shape to a teacher feature shape (FitNets' regressor).

    * maps with the same number of spatial dims: 1×1 convolution + BatchNorm over channels,
      then the spatial size is matched — bilinear (linear for 1-D) interpolation when the
      student map is smaller, adaptive average pooling when it is larger;
    * vectors: a linear layer;
    * anything else (vector → map, 1-D map → 2-D map, ...): flatten + linear, reshaped
      to the teacher's shape.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        if len(s) == len(t) and 2 <= len(s) <= 4:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(s) - 1]
            bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(s) - 1]
            self.kind = "conv"
            self.proj = nn.Sequential(conv(s[0], t[0], kernel_size=1, bias=False), bn(t[0]))
        elif len(s) == 1 and len(t) == 1:
            self.kind = "linear"
            self.proj = nn.Linear(s[0], t[0])
        else:
            self.kind = "flat"
            self.proj = nn.Linear(math.prod(s), math.prod(t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.proj(x)
        if self.kind == "flat":
            return self.proj(x.flatten(1)).view(x.shape[0], *self.teacher_shape)
        y = self.proj(x)
        size = self.teacher_shape[1:]
        if tuple(y.shape[2:]) == size:
            return y
        if math.prod(y.shape[2:]) > math.prod(size):
            pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(size)]
            return pool(y, size)
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        return F.interpolate(y, size=size, mode=mode, align_corners=False)


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int], mode: str) -> nn.Module:
    """``auto``: an adapter only when the shapes differ; ``always``: always one; ``none``: never
    (differing shapes are then an error)."""
    same = tuple(student_shape) == tuple(teacher_shape)
    if mode == "always" or (mode == "auto" and not same):
        return FeatureAdapter(student_shape, teacher_shape)
    if mode in ("auto", "none"):
        if not same:
            raise ConfigError(
                f"student feature {tuple(student_shape)} and teacher feature {tuple(teacher_shape)} differ "
                "but adapter=none; set adapter=auto")
        return nn.Identity()
    raise ConfigError(f"adapter must be one of auto, always, none; got {mode!r}")
