"""Feature-map losses of RepDistiller's catalogue: FitNets, AT, VID, AB, FSP and NST."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.distill._maps import conv, pool_to_smaller, spatial_dims
from compresslab.distill.losses import FeatureLoss
from compresslab.errors import ConfigError

__all__ = ["HintLoss", "ATLoss", "VIDLoss", "ABLoss", "FSPLoss", "NSTLoss", "fsp_matrix"]


class HintLoss(FeatureLoss):
    """FitNets hints (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", ICLR):
    mean squared error between the (adapted) student feature and the teacher's hint.

    The regressor of the paper is the distillation module's adapter (``needs_adapter``):
    1×1 conv (+BN) for maps, linear for vectors, resized to the teacher's spatial size.
    The optional first stage (train the student up to the hint layer on this loss alone)
    is the feature-loss entry's ``init_epochs``. RepDistiller weight: 100.
    """

    needs_adapter = True

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        return sum(F.mse_loss(s, t.detach()) for s, t in zip(student, teacher))


class ATLoss(FeatureLoss):
    """Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention", ICLR).

    Spatial attention map of a feature ``f`` (B, C, *spatial): ``a = normalize(mean_c |f|^p)``
    flattened, L2-normalised per sample; the loss is ``mean((a_s - a_t)²)`` summed over the
    tap pairs. Maps of different spatial sizes are average-pooled to the smaller one
    (as RepDistiller). p=2 and weight 1000 are RepDistiller's.
    """

    needs_spatial = True

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = float(p)

    def attention(self, f: torch.Tensor) -> torch.Tensor:
        """The normalised attention map of a feature map, flattened to (B, H·W...)."""
        return F.normalize(f.abs().pow(self.p).mean(dim=1).flatten(1), dim=1)

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        total = 0.0
        for s, t in zip(student, teacher):
            s, t = pool_to_smaller(s, t.detach())
            total = total + (self.attention(s) - self.attention(t)).pow(2).mean()
        return total



class VIDLoss(FeatureLoss):
    """Variational information distillation (Ahn et al. 2019, "Variational Information
    Distillation for Knowledge Transfer", CVPR).

    The teacher's feature is modelled as a Gaussian whose mean is regressed from the
    student's feature (three 1×1 convolutions with ReLUs between, student → teacher
    channels) and whose variance is learned per channel, ``σ² = softplus(α_c) + ε``; the loss
    is the negative log-likelihood ``mean(½((μ − t)²/σ² + log σ²))`` (constant dropped), summed
    over tap pairs. Maps of different spatial sizes are pooled to the smaller one. As
    RepDistiller's ``VIDLoss`` (from the authors' code): σ² initialised to 5, ε = 1e-5, the
    regressor's middle width = the teacher's channels, weight 1, taps every stage.
    """

    needs_spatial = True

    def __init__(self, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        if init_pred_var <= eps:
            raise ConfigError(f"vid: init_pred_var must be > eps, got {init_pred_var}")
        self.init_pred_var, self.eps = float(init_pred_var), float(eps)
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def build(self, student_shapes, teacher_shapes, num_samples):
        if len(self.regressors):
            return
        for s, t in zip(student_shapes, teacher_shapes):
            nd = spatial_dims(t, "vid")
            cs, ct = s[0], t[0]
            self.regressors.append(nn.Sequential(
                conv(nd, cs, ct, 1, bias=False), nn.ReLU(),
                conv(nd, ct, ct, 1, bias=False), nn.ReLU(),
                conv(nd, ct, ct, 1, bias=False)))
            init = math.log(math.exp(self.init_pred_var - self.eps) - 1.0)  # softplus⁻¹
            self.log_scales.append(nn.Parameter(torch.full((ct,), init)))

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        total = 0.0
        for s, t, reg, alpha in zip(student, teacher, self.regressors, self.log_scales):
            s, t = pool_to_smaller(s, t.detach())
            mean = reg(s)
            var = (F.softplus(alpha) + self.eps).view(1, -1, *([1] * (mean.dim() - 2)))
            total = total + (0.5 * ((mean - t).pow(2) / var + var.log())).mean()
        return total


class ABLoss(FeatureLoss):
    """Activation boundaries (Heo et al. 2019, "Knowledge Transfer via Distillation of
    Activation Boundaries Formed by Hidden Neurons", AAAI).

    On pre-ReLU features (taps ``stages_preact``) the student, through a connector (the
    module's adapter: 1×1 conv + BN), learns on which side of zero each teacher neuron is,
    with margin μ: ``Σ (s+μ)²·[s > −μ ∧ t ≤ 0] + (s−μ)²·[s ≤ μ ∧ t > 0]``, per tap divided by
    the batch size, times 3/1000, and weighted 2^(i−n+1) (the deepest tap 1, halving towards the
    input), summed — RepDistiller's ``ABLoss`` (from the authors' code), μ=1. The method is an
    initialisation: RepDistiller trains the student's feature layers and the connectors on this
    loss for 30 epochs (``init_epochs``), then trains on cross-entropy alone (``weight: 0``).
    """

    needs_adapter = True
    needs_spatial = True

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = float(margin)

    def boundary_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The paper's squared hinge, summed: ``(s + m)²`` where the teacher is off (t ≤ 0) but the
        student is above −m, ``(s − m)²`` where the teacher is on (t > 0) but the student is below m."""
        m = self.margin
        loss = ((s + m).pow(2) * ((s > -m) & (t <= 0)).to(s.dtype)
                + (s - m).pow(2) * ((s <= m) & (t > 0)).to(s.dtype))
        return loss.sum()

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        n = len(student)
        total = 0.0
        for i, (s, t) in enumerate(zip(student, teacher)):
            w = 2.0 ** (i - n + 1)
            total = total + w * self.boundary_loss(s, t.detach()) / s.shape[0] / 1000 * 3
        return total


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The FSP ("flow of solution procedure") matrix of two maps of one spatial size:
    ``G[i, j] = mean_positions a_i · b_j``, shape (B, C_a, C_b)."""
    return torch.einsum("bix,bjx->bij", a.flatten(2), b.flatten(2)) / a.shape[2:].numel()


class FSPLoss(FeatureLoss):
    """Flow of solution procedure (Yim et al. 2017, "A Gift from Knowledge Distillation: Fast
    Optimization, Network Minimization and Transfer Learning", CVPR).

    Taps come in pairs, the first and the last layer of a section at one resolution
    (``sections``): each pair gives the FSP matrix ``G = mean_positions F1ᵢ F2ⱼ``, and the loss
    is ``mean((G_s − G_t)²)`` summed over the pairs. The two maps of a pair must have the same
    spatial size (refused before training otherwise). The paper and RepDistiller require the
    student's channels to equal the teacher's; where they differ, the module's adapter (1×1
    conv + BN) maps each student map to the teacher's channels. As RepDistiller, FSP is an
    initialisation stage (30 epochs on this loss, ``init_epochs``) followed by cross-entropy
    training (``weight: 0``).
    """

    needs_adapter = True
    needs_spatial = True

    def build(self, student_shapes, teacher_shapes, num_samples):
        if len(student_shapes) % 2:
            raise ConfigError(f"fsp: taps come in pairs (first and last layer of a section), got {len(student_shapes)}")
        for role, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
            for k in range(0, len(shapes), 2):
                if tuple(shapes[k][1:]) != tuple(shapes[k + 1][1:]):
                    raise ConfigError(
                        f"fsp: the {role}'s tap pair {k // 2} has maps of different spatial sizes "
                        f"{tuple(shapes[k][1:])} and {tuple(shapes[k + 1][1:])}; an FSP matrix pairs two layers "
                        "of one section at one resolution (use student_layers/teacher_layers: [sections], or "
                        "taps of equal size)")

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        total = 0.0
        for k in range(0, len(student), 2):
            g_s = fsp_matrix(student[k], student[k + 1])
            g_t = fsp_matrix(teacher[k].detach(), teacher[k + 1].detach())
            total = total + (g_s - g_t).pow(2).mean()
        return total


class NSTLoss(FeatureLoss):
    """Neuron selectivity transfer (Huang & Wang 2017, "Like What You Like: Knowledge Distill
    via Neuron Selectivity Transfer", arXiv:1707.01219).

    Each channel's map, flattened over positions and L2-normalised, is a sample of the
    network's "neuron selectivity" distribution; the loss is the squared MMD between the
    student's and the teacher's channel sets with the polynomial kernel ``k(x, y) = (xᵀy)²``
    (d=2, c=0): ``mean k(t,t) + mean k(s,s) − 2 mean k(s,t)``, summed over tap pairs (maps pooled
    to the smaller size). As RepDistiller (weight 50, every stage).
    """

    needs_spatial = True

    @staticmethod
    def poly_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean of the polynomial kernel ``(aᵢᵀbⱼ)²`` over every channel pair of the batch."""
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()

    def forward(self, student, teacher, *, target=None, index=None, epoch=0):
        total = 0.0
        for s, t in zip(student, teacher):
            s, t = pool_to_smaller(s, t.detach())
            s = F.normalize(s.flatten(2), dim=2)
            t = F.normalize(t.flatten(2), dim=2)
            total = total + self.poly_mean(t, t) + self.poly_mean(s, s) - 2 * self.poly_mean(s, t)
        return total
