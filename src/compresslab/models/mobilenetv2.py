"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018), CIFAR variant: stride-1 stem and stride-1 second stage, so a 32x32 input ends
at 4x4 (and an 8x8 input at 1x1).

Module paths: stem ``conv1``/``bn1``, stages ``layer1``..``layer7``, last 1x1 conv
``conv2``/``bn2``, head ``classifier``.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from compresslab.errors import ConfigError
from compresslab.models.common import init_weights, require_image_input

#: (expansion t, output channels c, repeats n, first stride s); strides of the stem and the
#: 24-channel stage are 1 instead of ImageNet's 2.
CIFAR_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise 3x3 - linear project (1x1), with an identity skip when the
    stride is 1 and the channel count is unchanged (Sandler et al. 2018)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_planes * expand_ratio))
        self.use_residual = stride == 1 and in_planes == out_planes
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 of Sandler et al. 2018 for small images; ``width_mult`` scales every
    width (rounded to multiples of 8), e.g. 0.5 for CRD's ``MobileNetV2`` student."""

    stage_names = ("layer1", "layer2", "layer3", "layer4", "layer5", "layer6", "layer7")

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width_mult: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, _, _ = require_image_input("mobilenetv2", input_shape)
        if width_mult <= 0:
            raise ConfigError(f"MobileNetV2 width_mult must be positive, got {width_mult}.")
        stem = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * width_mult) if width_mult > 1.0 else 1280

        self.conv1 = nn.Conv2d(c, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu1 = nn.ReLU6(inplace=True)
        in_planes = stem
        for i, (t, ch, n, s) in enumerate(CIFAR_SETTING):
            out_planes = _make_divisible(ch * width_mult)
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(in_planes, out_planes, s if j == 0 else 1, t))
                in_planes = out_planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.conv2 = nn.Conv2d(in_planes, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.relu2 = nn.ReLU6(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(last, num_classes)
        self.out_features = last
        init_weights(self)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.layer5(x)
        x = self.layer6(x)
        x = self.layer7(x)
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.classifier(self.dropout(self.flatten(self.avgpool(x))))
