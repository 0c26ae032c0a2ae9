"""Relational distillation losses: SP, PKT, RKD, correlation congruence (CC) and DIST."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.distill.losses import FeatureLoss, LogitLoss
from compresslab.errors import ConfigError

__all__ = ["SPLoss", "PKTLoss", "RKDLoss", "CCLoss", "DISTLoss", "pearson_rows"]


class SPLoss(FeatureLoss):
    """Similarity-preserving KD (Tung & Mori 2019, "Similarity-Preserving Knowledge
    Distillation", ICCV): match the batch's pairwise-similarity matrices.

    ``G = normalize_rows(F Fᵀ)`` for the flattened features F (B, D); loss
    ``‖G_t − G_s‖²_F / B²`` summed over tap pairs. Weight 3000 (RepDistiller).
    """

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        total = 0.0
        for s, t in zip(student, teacher):
            b = s.shape[0]
            s, t = s.flatten(1), t.detach().flatten(1)
            g_s = F.normalize(s @ s.t(), dim=1)
            g_t = F.normalize(t @ t.t(), dim=1)
            total = total + (g_t - g_s).pow(2).sum() / (b * b)
        return total


class PKTLoss(FeatureLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018, "Learning Deep Representations
    with Probabilistic Knowledge Transfer", ECCV).

    Cosine similarities of the batch's embeddings, mapped to [0, 1] and normalised per row
    into conditional probabilities; the loss is the KL divergence between the teacher's and
    the student's, averaged over all pairs. Weight 30000 (RepDistiller).
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = float(eps)

    def _probabilities(self, f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(1)
        f = f / (f.norm(dim=1, keepdim=True) + self.eps)
        sim = (f @ f.t() + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        total = 0.0
        for s, t in zip(student, teacher):
            p_s, p_t = self._probabilities(s), self._probabilities(t.detach())
            total = total + (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()
        return total


class RKDLoss(FeatureLoss):
    """Relational knowledge distillation (Park et al. 2019, "Relational Knowledge Distillation", CVPR).

    Distance-wise term: pairwise Euclidean distances of the batch's embeddings, each
    divided by its mean over distinct pairs, compared with the Huber (smooth-L1) loss.
    Angle-wise term: cosines of the angles formed by every triplet (e_i − e_j, e_k − e_j),
    compared with smooth-L1. ``w_d·distance + w_a·angle`` with the paper's 25 / 50.
    """

    def __init__(self, w_d: float = 25.0, w_a: float = 50.0) -> None:
        super().__init__()
        self.w_d, self.w_a = float(w_d), float(w_a)

    @staticmethod
    def _normalized_distances(e: torch.Tensor) -> torch.Tensor:
        diff = e.unsqueeze(0) - e.unsqueeze(1)
        d = diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()
        eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
        d = d.masked_fill(eye, 0.0)
        positive = d[d > 0]
        return d / positive.mean() if positive.numel() else d

    @staticmethod
    def _angles(e: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i] = e_i - e_j
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        total = 0.0
        for s, t in zip(student, teacher):
            s, t = s.flatten(1), t.detach().flatten(1)
            loss_d = F.smooth_l1_loss(self._normalized_distances(s), self._normalized_distances(t))
            loss_a = F.smooth_l1_loss(self._angles(s), self._angles(t))
            total = total + self.w_d * loss_d + self.w_a * loss_a
        return total


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
