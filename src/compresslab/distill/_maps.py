"""Small helpers shared by the feature-map losses: 1-/2-/3-D layer classes and spatial matching."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.errors import ConfigError

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def spatial_dims(shape: Sequence[int], what: str) -> int:
    """Number of spatial dims of a per-sample feature shape ``(C, *spatial)`` (1 to 3)."""
    nd = len(shape) - 1
    if nd not in _CONV:
        raise ConfigError(f"{what}: needs feature maps (C, L), (C, H, W) or (C, D, H, W), got a feature of shape "
                          f"{tuple(shape)}")
    return nd


def conv(nd: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv{nd}d(*args, **kwargs)``."""
    return _CONV[nd](*args, **kwargs)


def conv_transpose(nd: int, *args, **kwargs) -> nn.Module:
    """``nn.ConvTranspose{nd}d(*args, **kwargs)``."""
    return _CONVT[nd](*args, **kwargs)


def batchnorm(nd: int, channels: int) -> nn.Module:
    """``nn.BatchNorm{nd}d(channels)``."""
    return _BN[nd](channels)


def pool_to(f: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of ``(B, C, *spatial)`` to ``size`` (a no-op when it already is)."""
    if tuple(f.shape[2:]) == tuple(size):
        return f
    return {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}[f.dim()](f, tuple(size))


def pool_to_smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the map with more positions down to the other's spatial size (as RepDistiller does)."""
    na, nb = a.shape[2:].numel(), b.shape[2:].numel()
    if na > nb:
        a = pool_to(a, b.shape[2:])
    elif nb > na:
        b = pool_to(b, a.shape[2:])
    return a, b
