"""The catalogue of distillation losses.

Two kinds, both :class:`torch.nn.Module`:

* **logit losses** (:class:`LogitLoss`): ``loss(student_logits, teacher_logits, target=..., epoch=...)``;
  :class:`~compresslab.distill.module.DistillationModule` weighs one of them with ``kd_weight``.
* **feature losses** (:class:`FeatureLoss`): ``loss(student_feats, teacher_feats, target=..., index=..., epoch=...)``
  where the features are lists with one tensor per tap pair (``student_layers[i]`` ↔ ``teacher_layers[i]``);
  each is weighed with its own ``weight``.

Every loss detaches the teacher's inputs itself, so no gradient reaches the teacher
even when a caller forgets ``torch.no_grad``. Defaults follow the published recipes
(RepDistiller, Tian et al. 2020, for the feature methods; mdistiller, Zhao et al. 2022,
for DKD); the weights that go with them live in ``conf/distill/*.yaml``.

To add a method: subclass :class:`FeatureLoss` (or :class:`LogitLoss`), implement
``forward``, set the class flags, and write ``conf/distill/<name>.yaml`` naming it.
"""

from __future__ import annotations

import abc
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.errors import ConfigError

__all__ = [
    "LogitLoss", "FeatureLoss", "KDLoss", "LSKDLoss", "DKDLoss", "HintLoss", "ATLoss", "SPLoss",
    "PKTLoss", "RKDLoss", "CRDLoss", "standardize_logits", "kd_divergence",
]


# ----------------------------------------------------------------------------- bases
class LogitLoss(nn.Module, abc.ABC):
    """Base of the losses on the teacher's and the student's logits."""

    @abc.abstractmethod
    def forward(self, student: torch.Tensor, teacher: torch.Tensor, *, target: torch.Tensor | None = None,
                epoch: int = 0) -> torch.Tensor:
        """The loss of a batch of student logits against the teacher's."""


class FeatureLoss(nn.Module, abc.ABC):
    """Base of the losses on intermediate features captured at the configured taps.

    Class flags read by the distillation module:

    * ``needs_adapter``: compares features element-wise, so a learnable adapter maps the
      student's feature to the teacher's shape when they differ (FitNet's regressor);
    * ``needs_spatial``: needs feature maps ``(B, C, *spatial)``, not vectors (AT);
    * ``max_taps``: the most tap pairs the loss accepts (None: any number, summed).

    :meth:`build` is called once the feature shapes (without batch dim) and the
    number of training samples are known, before the optimizer is created:
    losses with parameters or buffers (CRD) create them there.
    """

    needs_adapter: bool = False
    needs_spatial: bool = False
    max_taps: int | None = None
    #: the stage before the main fit (``init_epochs``) runs the student up to its taps and trains
    #: those layers (FitNets, AB, FSP); False: the stage trains only the loss's own modules on the
    #: teacher's features (FT's paraphraser), described by ``stage_description``
    stage_uses_student: bool = True
    stage_description: str = ""
    #: the module passes the teacher's BatchNorm before each teacher tap to :meth:`bind_teacher_bn` (OFD)
    needs_teacher_bn: bool = False

    @property
    def needs_index(self) -> bool:
        """Whether ``forward`` needs each sample's index in the training set."""
        return False

    def stage_loss(self, student: list[torch.Tensor] | None, teacher: list[torch.Tensor], *,
                   target: torch.Tensor | None = None, index: torch.Tensor | None = None,
                   epoch: int = 0) -> torch.Tensor:
        """The loss of the stage before the main fit (default: this loss itself)."""
        return self(student, teacher, target=target, index=index, epoch=epoch)

    def stage_parameters(self) -> list[nn.Parameter]:
        """The loss's parameters its stage trains (default: all)."""
        return [p for p in self.parameters() if p.requires_grad]

    def main_parameters(self) -> list[nn.Parameter]:
        """The loss's parameters the main fit trains (default: all)."""
        return [p for p in self.parameters() if p.requires_grad]

    def bind_teacher_bn(self, bns: Sequence[nn.Module]) -> None:
        """Receive the teacher's BatchNorm before each teacher tap; called only for losses that
        set ``needs_teacher_bn``, which must override it (OFD)."""
        raise TypeError(f"{type(self).__name__} sets needs_teacher_bn but does not override bind_teacher_bn")

    def build(self, student_shapes: Sequence[tuple[int, ...]], teacher_shapes: Sequence[tuple[int, ...]],
              num_samples: int | None) -> None:
        """Create shape-dependent parameters/buffers (default: nothing to create)."""

    @abc.abstractmethod
    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], *,
                target: torch.Tensor | None = None, index: torch.Tensor | None = None,
                epoch: int = 0) -> torch.Tensor:
        """The loss of the student's tapped features against the teacher's (one entry per tap)."""


# ----------------------------------------------------------------------------- logit methods
def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row of logits: ``(z - mean(z)) / (std(z) + eps)`` (unbiased std, as Sun et al. 2024)."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def kd_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature ** 2


class KDLoss(LogitLoss):
    """Soft-target knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the
    Knowledge in a Neural Network"): ``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``.

    The T² factor keeps the soft-target gradients on the scale of the hard-label ones.
    T=4 is the CIFAR-100 recipe of RepDistiller/CRD (Tian et al. 2020) and mdistiller.
    With ``standardize=True`` the logits are Z-scored first (see :class:`LSKDLoss`).
    """

    def __init__(self, temperature: float = 4.0, standardize: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"KD temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.standardize = bool(standardize)

    def forward(self, student, teacher, *, target=None, epoch=0):
        teacher = teacher.detach()
        if self.standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        return kd_divergence(student, teacher, self.temperature)


class LSKDLoss(KDLoss):
    """KD with logit standardization (Sun et al. 2024, "Logit Standardization in Knowledge
    Distillation", CVPR): teacher and student logits are Z-scored per sample before the
    temperature softmax, so the student matches the teacher's logit *relations* rather
    than their scale. Their CIFAR-100 KD setting: base temperature 2, KD weight 9, CE 0.1.
    """

    def __init__(self, temperature: float = 2.0, standardize: bool = True) -> None:
        super().__init__(temperature=temperature, standardize=standardize)


class DKDLoss(LogitLoss):
    """Decoupled knowledge distillation (Zhao et al. 2022, "Decoupled Knowledge Distillation", CVPR).

    KD splits into TCKD, the KL between binary (target, non-target) probabilities,
    and NCKD, the KL between the distributions over the non-target classes only;
    DKD weighs them independently: ``alpha·TCKD + beta·NCKD`` (each times T²), ramped
    up linearly over ``warmup_epochs`` epochs (factor ``min((epoch+1)/warmup, 1)``,
    epochs counted from 1 as in mdistiller). Defaults: mdistiller's CIFAR-100 config
    (alpha 1, beta 8, T 4, warm-up 20 epochs).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup_epochs: int = 20) -> None:
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = float(temperature)
        self.warmup_epochs = int(warmup_epochs)

    def warmup_factor(self, epoch: int) -> float:
        """Linear warm-up factor for (0-based) ``epoch``."""
        if self.warmup_epochs <= 0:
            return 1.0
        return min((int(epoch) + 1) / self.warmup_epochs, 1.0)

    @staticmethod
    def _binary_log_probs(z_gt: torch.Tensor, z_nt: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` log-probabilities [log p(target), log p(non-target)] from the (scaled) target
        logit ``z_gt`` (N,) and the non-target logits ``z_nt`` (N, C-1), never forming 1 - p."""
        lse_nt = torch.logsumexp(z_nt, dim=1)
        lse_all = torch.logaddexp(z_gt, lse_nt)
        return torch.stack([z_gt - lse_all, lse_nt - lse_all], dim=1)

    def forward(self, student, teacher, *, target=None, epoch=0):
        if target is None:
            raise ValueError("DKD needs the labels (target=...)")
        teacher = teacher.detach()
        t = self.temperature
        n, c = student.shape
        gt = F.one_hot(target, c).bool()
        s_nt = student[~gt].view(n, c - 1) / t
        t_nt = teacher[~gt].view(n, c - 1) / t
        # TCKD: KL between the binary distributions [p(target), p(non-target)], in log space:
        # log p(non-target) = logsumexp(non-target logits) - logsumexp(all logits). Written as
        # log(1 - p(target)) it rounds to log(0) in float32 for a confident network (gap ~17+ at
        # T=1), which a clamp turns into a wrong value with a zero gradient.
        log_b_s = self._binary_log_probs(student[gt] / t, s_nt)
        log_b_t = self._binary_log_probs(teacher[gt] / t, t_nt)
        tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(1).mean() * t ** 2
        # NCKD: distributions over the C-1 non-target classes
        log_q_s, log_q_t = F.log_softmax(s_nt, dim=1), F.log_softmax(t_nt, dim=1)
        nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(1).mean() * t ** 2
        return self.warmup_factor(epoch) * (self.alpha * tckd + self.beta * nckd)


# ----------------------------------------------------------------------------- feature methods
def _pool_to(f: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive-average-pool a (B, C, *spatial) map to ``size`` (1-D or 2-D spatial)."""
    if tuple(f.shape[2:]) == tuple(size):
        return f
    if f.dim() == 3:
        return F.adaptive_avg_pool1d(f, size)
    if f.dim() == 4:
        return F.adaptive_avg_pool2d(f, size)
    if f.dim() == 5:
        return F.adaptive_avg_pool3d(f, size)
    raise ValueError(f"cannot pool a feature of shape {tuple(f.shape)}")


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
            t = t.detach()
            s_size, t_size = s.shape[2:], t.shape[2:]
            if s_size.numel() > t_size.numel():
                s = _pool_to(s, t_size)
            elif s_size.numel() < t_size.numel():
                t = _pool_to(t, s_size)
            total = total + (self.attention(s) - self.attention(t)).pow(2).mean()
        return total


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


class _Embed(nn.Module):
    """Linear projection + L2 normalisation (CRD's embedding head)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRDLoss(FeatureLoss):
    """Contrastive representation distillation (Tian, Krishnan & Isola 2020, "Contrastive
    Representation Distillation", ICLR).

    Student and teacher embeddings are projected (learned linear heads) to ``feat_dim``
    and L2-normalised. Each student embedding is contrasted against the teacher memory
    entry of the same sample (positive) and ``nce_k`` other samples' entries (negatives),
    and symmetrically for the teacher embedding against the student memory, with the
    NCE loss of the paper (noise distribution uniform over the N training samples,
    normalising constant Z fixed from the first batch). Memories are updated with
    momentum ``momentum`` and renormalised. Defaults are RepDistiller's (feat_dim 128,
    K=16384, T=0.07, momentum 0.5; weight 0.8); K is capped at N−1.

    Negatives are drawn uniformly from the other training samples (RepDistiller draws
    them from the other classes on CIFAR). The memory bank holds 2·N·feat_dim floats,
    as buffers, so it is saved in checkpoints and resumes; when N exceeds
    ``max_bank_samples`` (large datasets) a bounded FIFO queue of ``queue_size`` recent
    embeddings replaces it (positives then come from the current batch, as in MoCo).
    """

    max_taps = 1

    def __init__(self, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, momentum: float = 0.5,
                 max_bank_samples: int = 200_000, queue_size: int | None = None, eps: float = 1e-7) -> None:
        super().__init__()
        self.feat_dim, self.nce_k, self.nce_t = int(feat_dim), int(nce_k), float(nce_t)
        self.momentum, self.max_bank_samples = float(momentum), int(max_bank_samples)
        self.queue_size = int(queue_size or nce_k)
        self.eps = float(eps)
        self.num_samples: int | None = None
        self.mode: str | None = None
        self.embed_s: _Embed | None = None
        self.embed_t: _Embed | None = None

    @property
    def needs_index(self) -> bool:
        return self.mode != "queue"

    def build(self, student_shapes, teacher_shapes, num_samples):
        if self.embed_s is not None:
            return
        if not num_samples:
            raise ConfigError("crd needs the number of training samples to size its memory bank")
        self.num_samples = int(num_samples)
        self.embed_s = _Embed(math.prod(student_shapes[0]), self.feat_dim)
        self.embed_t = _Embed(math.prod(teacher_shapes[0]), self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        if self.num_samples <= self.max_bank_samples:
            self.mode = "bank"
            rows = self.num_samples
        else:
            self.mode = "queue"
            rows = self.queue_size
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("memory_s", torch.rand(rows, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(rows, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        # NCE normalising constants of the student / teacher scores (-1: set from the first batch)
        self.register_buffer("z", torch.full((2,), -1.0))

    @property
    def num_negatives(self) -> int:
        """Negatives per anchor: ``nce_k`` capped at N−1 (bank) or the queue size (queue)."""
        if self.mode == "queue":
            return self.queue_size
        return max(1, min(self.nce_k, self.num_samples - 1))

    def sample_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) uniform random sample indices, never the anchor's own index."""
        k, n = self.num_negatives, self.num_samples
        neg = torch.randint(0, n - 1, (index.shape[0], k), device=index.device)
        return neg + (neg >= index.unsqueeze(1)).long()

    def nce_loss(self, scores: torch.Tensor) -> torch.Tensor:
        """NCE loss of CRD for (B, 1+K) normalised scores whose column 0 is the positive."""
        m = scores.shape[1] - 1
        noise = m / float(self.num_samples)
        pos, neg = scores[:, 0], scores[:, 1:]
        log_d1 = torch.log(pos / (pos + noise + self.eps))
        log_d0 = torch.log(noise / (neg + noise + self.eps))
        return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]

    def forward(self, student, teacher, *, target=None, index=None, epoch=0, contrast_index=None):
        if self.embed_s is None:
            raise RuntimeError("CRDLoss.build() must run before forward (the distillation module does it)")
        v_s = self.embed_s(student[0])
        v_t = self.embed_t(teacher[0].detach())
        if self.mode == "bank":
            if index is None:
                raise ValueError("crd needs each sample's training-set index (index=...)")
            index = index.to(self.memory_s.device).long()
            neg = contrast_index if contrast_index is not None else self.sample_negatives(index)
            idx = torch.cat([index.unsqueeze(1), neg.to(index.device).long()], dim=1)  # (B, 1+K)
            # student anchors against the teacher memory, teacher anchors against the student memory
            out_s = torch.exp(self._similarities(v_s, self.memory_t, idx) / self.nce_t)
            out_t = torch.exp(self._similarities(v_t, self.memory_s, idx) / self.nce_t)
        else:
            # positives: the other network's embedding of the same sample; negatives: the queue
            # (copied: the queue is updated in place after the forward)
            pos = (v_s * v_t.detach()).sum(1, keepdim=True)
            out_s = torch.exp(torch.cat([pos, v_s @ self.memory_t.clone().t()], 1) / self.nce_t)
            pos_t = (v_t * v_s.detach()).sum(1, keepdim=True)
            out_t = torch.exp(torch.cat([pos_t, v_t @ self.memory_s.clone().t()], 1) / self.nce_t)
        with torch.no_grad():  # Z: fixed from the first batch's mean score (as the paper)
            if self.z[0] < 0:
                self.z[0] = out_s.mean() * self.num_samples
            if self.z[1] < 0:
                self.z[1] = out_t.mean() * self.num_samples
        loss = self.nce_loss(out_s / self.z[0]) + self.nce_loss(out_t / self.z[1])
        if self.training:
            self._update_memory(v_s.detach(), v_t.detach(), index)
        return loss

    @staticmethod
    def _similarities(v: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``<memory[idx[i, k]], v[i]>`` as (B, 1+K). When the draws cover a good part of the bank,
        one matrix product with the whole bank is much cheaper than gathering B·(1+K) rows."""
        memory = memory.detach()
        if memory.shape[0] <= 4 * idx.shape[1]:  # (a copy: the memory is updated in place after the forward)
            return (v @ memory.clone().t()).gather(1, idx)
        return torch.bmm(memory[idx], v.unsqueeze(2)).squeeze(2)

    @torch.no_grad()
    def _update_memory(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor | None) -> None:
        if self.mode == "bank":
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                mixed = memory[index] * self.momentum + v * (1.0 - self.momentum)
                memory.index_copy_(0, index, F.normalize(mixed, dim=1))
        else:
            q = self.queue_size
            v_s, v_t = v_s[-q:], v_t[-q:]
            rows = (self.queue_ptr + torch.arange(v_s.shape[0], device=v_s.device)) % q
            self.memory_s[rows] = v_s
            self.memory_t[rows] = v_t
            self.queue_ptr.copy_((self.queue_ptr + v_s.shape[0]) % q)
