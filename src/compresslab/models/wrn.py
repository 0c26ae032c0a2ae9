"""Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016):
pre-activation BasicBlocks, depth 6n+4, widths 16/32/64 x ``widen_factor``.

Module paths: stem ``conv1``, stages ``layer1``..``layer3``, final ``bn1``, head ``fc``.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from compresslab.errors import ConfigError
from compresslab.models.common import init_weights, require_image_input


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3; a 1x1 conv shortcut on
    the pre-activated input when the shape changes (as in the reference implementation)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        # Fixed at construction, so the forward stays free of data-dependent branches.
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut = (
            nn.Identity() if self.equal_in_out else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        )

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(self.relu2(self.bn2(y))))
        if self.equal_in_out:
            return y + x
        return y + self.shortcut(o)


class WideResNet(nn.Module):
    """WRN-depth-k of Zagoruyko & Komodakis 2016 (e.g. WRN-16-2, WRN-40-2): a 16-channel
    stem, three stages of (depth-4)/6 wide blocks with strides 1/2/2, BN-ReLU, average
    pool, linear ``fc``."""

    stage_names = ("layer1", "layer2", "layer3")

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 16,
        widen_factor: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, _, _ = require_image_input(f"wrn_{depth}_{widen_factor}", input_shape)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"Wide ResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}.")
        if widen_factor < 1:
            raise ConfigError(f"Wide ResNet widen_factor must be >= 1, got {widen_factor}.")
        n = (depth - 4) // 6
        widths = [16 * int(widen_factor), 32 * int(widen_factor), 64 * int(widen_factor)]

        self.conv1 = nn.Conv2d(c, 16, 3, stride=1, padding=1, bias=False)
        in_planes = 16
        stages = []
        for w, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(WideBasicBlock(in_planes, w, stride if i == 0 else 1, dropout))
                in_planes = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        self.out_features = in_planes
        init_weights(self)

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn1(x))
        return self.fc(self.flatten(self.avgpool(x)))
