"""Relational distillation losses: correlation congruence (CC) and DIST."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.distill.losses import FeatureLoss, LogitLoss
from compresslab.errors import ConfigError

__all__ = ["CCLoss", "DISTLoss", "pearson_rows"]


class CCLoss(FeatureLoss):
    """Correlation congruence (Peng et al. 2019, "Correlation Congruence for Knowledge
    Distillation", ICCV): match the batch's instance-correlation matrices.

    The embeddings are projected by learned linear heads to ``feat_dim`` (RepDistiller's
    ``LinearEmbed``, 128) and L2-normalised; the correlation of two instances is the paper's
    P-order Taylor expansion of the Gaussian RBF kernel, which for unit vectors is
    ``k(x, y) = Σ_{p=0..P} exp(-2γ) (2γ)^p / p! · (xᵀy)^p``; the loss is the mean squared
    difference of the student's and the teacher's B×B matrices (‖C_t − C_s‖²_F / B²).
    γ=0.4, P=2 (the paper's kernel setting as implemented by torchdistill and others).
    RepDistiller's own ``Correlation`` (code the authors sent it) is a different, kernel-free
    formula; its weight 0.02 is used with this one unchanged.
    """

    max_taps = 1

    def __init__(self, feat_dim: int = 128, gamma: float = 0.4, order: int = 2) -> None:
        super().__init__()
        if gamma <= 0 or int(order) < 0:
            raise ConfigError(f"cc: gamma must be > 0 and order >= 0, got {gamma}, {order}")
        self.feat_dim, self.gamma, self.order = int(feat_dim), float(gamma), int(order)
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None

    def build(self, student_shapes, teacher_shapes, num_samples):
        if self.embed_s is None:
            self.embed_s = nn.Linear(math.prod(student_shapes[0]), self.feat_dim)
            self.embed_t = nn.Linear(math.prod(teacher_shapes[0]), self.feat_dim)

    def correlation(self, e: torch.Tensor) -> torch.Tensor:
        """The B×B Taylor-RBF correlation matrix of unit-norm embeddings ``e`` (B, D)."""
        sim = e @ e.t()
        two_g = 2.0 * self.gamma
        out = torch.zeros_like(sim)
        for p in range(self.order + 1):
            out = out + math.exp(-two_g) * two_g ** p / math.factorial(p) * sim.pow(p)
        return out

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        if self.embed_s is None:
            raise RuntimeError("CCLoss.build() must run before forward (the distillation module does it)")
        e_s = F.normalize(self.embed_s(student[0].flatten(1)), dim=1)
        e_t = F.normalize(self.embed_t(teacher[0].detach().flatten(1)), dim=1)
        return (self.correlation(e_s) - self.correlation(e_t)).pow(2).mean()


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (the authors' eps)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DISTLoss(LogitLoss):
    """DIST (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher", NeurIPS):
    relations instead of exact KL matching of the predictions ``y = softmax(z/τ)``.

    Inter-class relation: ``1 − mean_i ρ(y_s[i,:], y_t[i,:])`` (each sample's class scores);
    intra-class relation: ``1 − mean_c ρ(y_s[:,c], y_t[:,c])`` (each class's scores over the
    batch), ρ the Pearson correlation; loss ``τ² (β·inter + γ·intra)``, as the authors'
    ``dist_kd.py``. Defaults β=γ=τ=1 are that code's defaults (the paper's ImageNet setting).
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"dist temperature must be > 0, got {temperature}")
        self.beta, self.gamma, self.temperature = float(beta), float(gamma), float(temperature)

    def forward(self, student, teacher, *, target=None, epoch=0):
        t = self.temperature
        y_s = F.softmax(student / t, dim=1)
        y_t = F.softmax(teacher.detach() / t, dim=1)
        inter = 1.0 - pearson_rows(y_s, y_t).mean()
        intra = 1.0 - pearson_rows(y_s.t(), y_t.t()).mean()
        return t * t * (self.beta * inter + self.gamma * intra)
