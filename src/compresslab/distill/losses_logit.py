"""Logit distillation losses: KD, KD with logit standardization, DKD, reverse KL (MiniLLM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compresslab.distill.losses import LogitLoss
from compresslab.errors import ConfigError

__all__ = ["KDLoss", "LSKDLoss", "DKDLoss", "ReverseKLLoss", "standardize_logits", "kd_divergence", "reverse_kl"]


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row of logits: ``(z - mean(z)) / (std(z) + eps)`` (unbiased std, as Sun et al. 2024)."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def kd_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    # Σ_c p_t (log p_t − log p_s), averaged over the batch, in one fused kernel (fewer ops per step)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(s/T) ‖ softmax(t/T))`` averaged over the rows: the *student's* distribution
    first (mode-seeking), where KD's forward KL puts the teacher's first (mode-covering)."""
    log_q = F.log_softmax(student / temperature, dim=1)
    log_p = F.log_softmax(teacher / temperature, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean() * temperature ** 2


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


class ReverseKLLoss(LogitLoss):
    """Reverse-KL distillation, the objective of MiniLLM (Gu, Dong, Wei & Huang 2024, "MiniLLM: Knowledge
    Distillation of Large Language Models", ICLR): ``T²·KL(q_student ‖ p_teacher)`` per token position,
    which makes the student concentrate on the teacher's major modes instead of spreading mass over
    everything the teacher finds plausible (forward KL, :class:`KDLoss`).

    What this implements of the paper: its loss, computed exactly over the vocabulary at every position of
    the training sequences (teacher-forced, the "token-level reverse KL" that DistiLLM, Ko et al. 2024,
    compares against). What it does not: MiniLLM optimises the *sequence-level* reverse KL with policy
    gradients on sequences sampled from the student (single-step decomposition, teacher-mixed sampling,
    length normalisation); that sampling loop is not part of this loss.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"reverse KL temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student, teacher, *, target=None, epoch=0):
        return reverse_kl(student, teacher.detach(), self.temperature)
