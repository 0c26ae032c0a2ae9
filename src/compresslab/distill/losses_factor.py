"""Factor transfer (FT): a paraphraser pre-trained on the teacher, then a translator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.distill._maps import batchnorm, conv, conv_transpose, pool_to_smaller, spatial_dims
from compresslab.distill.losses import FeatureLoss
from compresslab.errors import ConfigError

__all__ = ["FTLoss", "Paraphraser", "Translator"]


class Paraphraser(nn.Module):
    """The teacher-side autoencoder of FT: three 3×3 convs (C → C → kC → kC) with LeakyReLU(0.1)
    encode the "factor", three transposed convs decode it back (RepDistiller, no BatchNorm)."""

    def __init__(self, channels: int, k: float, nd: int) -> None:
        super().__init__()
        c, f = channels, max(1, int(channels * k))
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.encoder = nn.Sequential(conv(nd, c, c, 3, 1, 1), act(), conv(nd, c, f, 3, 1, 1), act(),
                                     conv(nd, f, f, 3, 1, 1), act())
        self.decoder = nn.Sequential(conv_transpose(nd, f, f, 3, 1, 1), act(), conv_transpose(nd, f, c, 3, 1, 1),
                                     act(), conv_transpose(nd, c, c, 3, 1, 1), act())

    def forward(self, x):
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """The student-side encoder of FT: three 3×3 conv-BN-LeakyReLU(0.1) to the factor's width."""

    def __init__(self, channels: int, factor_channels: int, nd: int) -> None:
        super().__init__()
        c, f = channels, factor_channels
        layers = []
        for cin, cout in ((c, c), (c, f), (f, f)):
            layers += [conv(nd, cin, cout, 3, 1, 1), batchnorm(nd, cout), nn.LeakyReLU(0.1)]
        self.encoder = nn.Sequential(*layers)

    def forward(self, x):
        return self.encoder(x)


class FTLoss(FeatureLoss):
    """Factor transfer (Kim, Park & Kwak 2018, "Paraphrasing Complex Network: Network Compression
    via Factor Transfer", NeurIPS).

    First stage (``init_epochs``, a fit of its own): a paraphraser (autoencoder with factor rate
    k) is trained on the teacher's feature alone to reconstruct it (MSE), then fixed. Main fit: a
    translator maps the student's feature to the factor space and is trained with the student on
    ``mean |φ(translator(s)) − φ(encoder(t))|^p2``. φ as RepDistiller's ``FactorTransfer``:
    ``normalize(mean_c f^p1)`` (p1=2, p2=1); the paper normalises the whole factor instead of
    averaging its channels first — RepDistiller's form is used because its weight (200) goes with
    it. k=0.5, 30 stage epochs, the last feature map (``auto``, RepDistiller's ``feat[-2]``).
    """

    max_taps = 1
    needs_spatial = True
    stage_uses_student = False
    stage_description = "the paraphraser is trained on the teacher's feature first"

    def __init__(self, k: float = 0.5, p1: float = 2.0, p2: float = 1.0) -> None:
        super().__init__()
        if not 0 < k:
            raise ConfigError(f"ft: the factor rate k must be > 0, got {k}")
        self.k, self.p1, self.p2 = float(k), float(p1), float(p2)
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    def build(self, student_shapes, teacher_shapes, num_samples):
        if self.paraphraser is not None:
            return
        nd = spatial_dims(teacher_shapes[0], "ft")
        if spatial_dims(student_shapes[0], "ft") != nd:
            raise ConfigError(f"ft: student feature {tuple(student_shapes[0])} and teacher feature "
                              f"{tuple(teacher_shapes[0])} have different numbers of spatial dims")
        self.paraphraser = Paraphraser(teacher_shapes[0][0], self.k, nd)
        self.translator = Translator(student_shapes[0][0], max(1, int(teacher_shapes[0][0] * self.k)), nd)

    def stage_parameters(self):
        return list(self.paraphraser.parameters())

    def main_parameters(self):
        return list(self.translator.parameters())

    def stage_loss(self, student, teacher, *, target=None, index=None, epoch=0):
        t = teacher[0].detach()
        return F.mse_loss(self.paraphraser(t), t)

    def factor(self, f: torch.Tensor) -> torch.Tensor:
        """The L2-normalised factor of a map: the channel mean of ``f^p1``, flattened."""
        return F.normalize(f.pow(self.p1).mean(1).flatten(1), dim=1)

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        if self.paraphraser is None:
            raise RuntimeError("FTLoss.build() must run before forward (the distillation module does it)")
        with torch.no_grad():  # the paraphraser is fixed after its stage
            was = self.paraphraser.training
            self.paraphraser.eval()
            factor_t = self.paraphraser.encoder(teacher[0].detach())
            self.paraphraser.train(was)
        factor_s = self.translator(student[0])
        factor_s, factor_t = pool_to_smaller(factor_s, factor_t)
        diff = self.factor(factor_s) - self.factor(factor_t)
        return diff.abs().mean() if self.p2 == 1 else diff.abs().pow(self.p2).mean()
