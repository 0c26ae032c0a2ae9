"""VGG with batch norm (Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015), in the CIFAR form used by RepDistiller / CRD
(Tian et al. 2020): five conv stages, max-pool between stages, global average pool and a
single linear ``classifier``; ``vgg8`` has one conv per stage.

Module paths: stages ``layer1``..``layer5``, pools ``pool1``..``pool4``, head ``classifier``.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from compresslab.errors import ConfigError
from compresslab.models.common import init_weights, require_image_input

#: Channels of each conv, per stage (RepDistiller's cfg 'S', 'A', 'B', 'D', 'E').
VGG_CONFIGS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class VGG(nn.Module):
    """VGG-``depth`` with BN (Simonyan & Zisserman 2015; depth 8/11/13/16/19). A 2x2 max-pool
    follows each of the first four stages unless the feature map has already shrunk to 1
    pixel (decided from ``input_shape`` at construction), so it also runs on 8x8 images."""

    stage_names = ("layer1", "layer2", "layer3", "layer4", "layer5")

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 11) -> None:
        super().__init__()
        c, h, w = require_image_input(f"vgg{depth}", input_shape)
        if depth not in VGG_CONFIGS:
            raise ConfigError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}.")
        for i, stage in enumerate(VGG_CONFIGS[depth]):
            layers: list[nn.Module] = []
            for width in stage:
                layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                c = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            if i < len(VGG_CONFIGS[depth]) - 1:
                if h > 1 and w > 1:
                    pool: nn.Module = nn.MaxPool2d(2)
                    h, w = h // 2, w // 2
                else:
                    pool = nn.Identity()
                setattr(self, f"pool{i + 1}", pool)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        self.out_features = c
        init_weights(self)

    def forward(self, x):
        x = self.pool1(self.layer1(x))
        x = self.pool2(self.layer2(x))
        x = self.pool3(self.layer3(x))
        x = self.pool4(self.layer4(x))
        x = self.layer5(x)
        return self.classifier(self.flatten(self.avgpool(x)))
