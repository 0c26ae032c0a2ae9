"""CIFAR ResNets: the 6n+2 BasicBlock family (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016, Sec. 4.2) and the 4x-wide ``resnet8x4`` / ``resnet32x4`` used as a
student/teacher pair by RepDistiller / CRD (Tian et al., "Contrastive Representation
Distillation", ICLR 2020).

Module paths are stable because distillation taps them: stem ``conv1``/``bn1``, stages
``layer1``..``layer3``, head ``fc``.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from compresslab.errors import ConfigError
from compresslab.models.common import init_weights, require_image_input


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an identity shortcut, or a 1x1 conv-BN projection
    (He et al. 2016, option B) when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) of He et al. 2016: a 3x3 stem, three stages of n BasicBlocks with
    16/32/64 x ``width`` channels and strides 1/2/2, global average pool, linear ``fc``.

    ``depth`` is 6n+2 (8, 14, 20, 32, 44, 56, 110, ...). ``stem_channels`` defaults to the
    first stage's width; RepDistiller's resnet8x4/resnet32x4 are ``width=4, stem_channels=32``.
    """

    stage_names = ("layer1", "layer2", "layer3")

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 20,
        width: float = 1,
        stem_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        c, _, _ = require_image_input(f"resnet{depth}" + (f"x{width:g}" if width != 1 else ""), input_shape)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth}.")
        if width <= 0:
            raise ConfigError(f"CIFAR ResNet width must be positive, got {width}.")
        n = (depth - 2) // 6
        planes = [max(1, round(p * width)) for p in (16, 32, 64)]
        stem = int(stem_channels) if stem_channels is not None else planes[0]

        self.conv1 = nn.Conv2d(c, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        in_planes = stem
        stages = []
        for p, stride in zip(planes, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, p, stride if i == 0 else 1))
                in_planes = p
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        self.out_features = in_planes
        init_weights(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet8x4(input_shape: Sequence[int], num_classes: int, **kwargs) -> CifarResNet:
    """RepDistiller's resnet8x4: 32-channel stem, stages of 64/128/256 channels, one block each."""
    return CifarResNet(input_shape, num_classes, depth=8, width=4, stem_channels=32, **kwargs)


def resnet32x4(input_shape: Sequence[int], num_classes: int, **kwargs) -> CifarResNet:
    """RepDistiller's resnet32x4: 32-channel stem, stages of 64/128/256 channels, five blocks each."""
    return CifarResNet(input_shape, num_classes, depth=32, width=4, stem_channels=32, **kwargs)
