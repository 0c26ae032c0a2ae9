"""Small classic networks: MLP / LeNet-300-100, LeNet-5, a small VGG-style ConvNet, 1-D CNNs."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from compresslab.models.common import (
    flat_features,
    init_weights,
    require_image_input,
    require_sequence_input,
)


class MLP(nn.Module):
    """Fully connected classifier on flattened input (LeNet-300-100 is ``hidden=[300, 100]``,
    LeCun et al. 1998; the pruning benchmark of Han et al. 2015)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (300, 100),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_features = 1
        for d in input_shape:
            in_features *= int(d)
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, int(width)), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = int(width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): conv5-pool-conv5-pool-fc120-fc84, padded so it fits
    any image size from 8x8 up. ``width`` scales the channel and hidden widths."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        c, _, _ = require_image_input("lenet5", input_shape)
        c1, c2 = max(1, round(6 * width)), max(1, round(16 * width))
        h1, h2 = max(1, round(120 * width)), max(1, round(84 * width))
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        n = flat_features(self.features, input_shape)
        self.classifier = nn.Sequential(
            nn.Linear(n, h1), nn.ReLU(inplace=True),
            nn.Linear(h1, h2), nn.ReLU(inplace=True),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class ConvNet(nn.Module):
    """Small VGG-style CNN (two conv-BN-ReLU blocks per stage, max-pool between stages,
    global average pool, linear head): a quick, accurate teacher for small images."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
    ) -> None:
        super().__init__()
        c, _, _ = require_image_input("convnet", input_shape)
        layers: list[nn.Module] = []
        for i, width in enumerate(channels):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                c = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class CNN1D(nn.Module):
    """1-D CNN for sequence data such as MNIST-1D: conv-BN-ReLU layers with stride 2,
    global average pool, linear head (the MNIST-1D paper's CNN baseline shape)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 32, 32),
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        c, _ = require_sequence_input("cnn1d", input_shape)
        layers: list[nn.Module] = []
        for i, width in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv1d(c, width, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(inplace=True),
            ]
            c = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))
