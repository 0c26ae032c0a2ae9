"""A comprehensive overhaul of feature distillation (OFD)."""

from __future__ import annotations

import math

import torch
from torch import nn

from compresslab.distill._maps import batchnorm, conv, pool_to, spatial_dims
from compresslab.distill.losses import FeatureLoss
from compresslab.errors import ConfigError

__all__ = ["OFDLoss", "ofd_margin"]


def ofd_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-channel margin of OFD: the expectation of a teacher pre-ReLU response below zero,
    ``E[x | x < 0]`` for ``x ~ N(β, γ²)`` from the BatchNorm that produces it:
    ``m − s·φ(m/s)/Φ(−m/s)`` with s=|γ|, m=β; ``−3s`` where ``Φ(−m/s) ≤ 0.001`` (as the authors' code)."""
    s = weight.detach().abs().double().clamp_min(1e-12)
    m = bias.detach().double()
    cdf = 0.5 * (1 + torch.erf((-m / s) / math.sqrt(2.0)))
    pdf = torch.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(cdf > 0.001, -s * pdf / cdf.clamp_min(1e-300) + m, -3 * s)
    return margin.float()


class OFDLoss(FeatureLoss):
    """OFD (Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation", ICCV).

    Distils pre-ReLU features (taps ``stages_preact``) through a connector (1×1 conv + BN, student
    → teacher channels, He-initialised) with the partial L2 distance: positions where the teacher
    is positive are matched exactly, negative teacher responses only as far as the student exceeds
    them, and responses below the margin m not at all —
    ``(s−m)²·[s > m ∧ t ≤ m] + (s−t)²·[s > t ∧ m < t ≤ 0] + (s−t)²·[t > 0]``,
    summed over channels and positions, averaged over the batch. The margin of each teacher
    channel is the expected negative response of a Gaussian with the teacher's BatchNorm
    statistics (:func:`ofd_margin`). The teacher map is pooled to the student's size; tap i of n
    is weighted 1/2^(n−1−i). As mdistiller's ``OFD`` (weight 0.001, CE 1, kernel 1).
    """

    needs_spatial = True
    needs_teacher_bn = True

    def __init__(self) -> None:
        super().__init__()
        self.connectors = nn.ModuleList()
        self._bn_margins: list[torch.Tensor] | None = None
        self.n_taps = 0

    def bind_teacher_bn(self, bns):
        self._bn_margins = [ofd_margin(bn.weight, bn.bias) if bn.affine else None for bn in bns]
        for bn, margin in zip(bns, self._bn_margins):
            if margin is None:
                raise ConfigError(f"ofd: the teacher's BatchNorm {bn} has no affine weight/bias for the margin")

    def build(self, student_shapes, teacher_shapes, num_samples):
        if len(self.connectors):
            return
        if self._bn_margins is None:
            raise RuntimeError("OFDLoss needs bind_teacher_bn() before build() (the distillation module does it)")
        for i, (s, t, margin) in enumerate(zip(student_shapes, teacher_shapes, self._bn_margins)):
            nd = spatial_dims(s, "ofd")
            if margin.numel() != t[0]:
                raise ConfigError(f"ofd: teacher tap {i} has {t[0]} channels but the BatchNorm before it has "
                                  f"{margin.numel()}; tap the pre-ReLU output of that BatchNorm (stages_preact)")
            c, bn = conv(nd, s[0], t[0], 1, bias=False), batchnorm(nd, t[0])
            nn.init.normal_(c.weight, 0.0, math.sqrt(2.0 / (c.weight[0, 0].numel() * t[0])))
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)
            self.connectors.append(nn.Sequential(c, bn))
            self.register_buffer(f"margin_{i}", margin.view(1, -1, *([1] * nd)).clone())
        self.n_taps = len(student_shapes)

    @staticmethod
    def partial_l2(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """OFD's partial L2 distance, summed and averaged over the batch: ``(s − m)²`` where the teacher
        is at or below the margin ``m`` and the student above it, ``(s − t)²`` where the teacher is
        positive, or negative above ``m`` with the student above it; no penalty elsewhere."""
        m = m.to(s)
        loss = ((s - m).pow(2) * ((s > m) & (t <= m)).to(s.dtype)
                + (s - t).pow(2) * ((s > t) & (t > m) & (t <= 0)).to(s.dtype)
                + (s - t).pow(2) * (t > 0).to(s.dtype))
        return loss.sum() / s.shape[0]

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        total = 0.0
        n = len(student)
        for i, (s, t) in enumerate(zip(student, teacher)):
            s = self.connectors[i](s)
            t = pool_to(t.detach(), s.shape[2:])
            total = total + self.partial_l2(s, t, getattr(self, f"margin_{i}")) / 2 ** (n - 1 - i)
        return total
