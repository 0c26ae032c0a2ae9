"""DeiT distillation (Touvron et al. 2021, "Training data-efficient image transformers &
distillation through attention", ICML), ``distill=deit``.

With ``kind: hard`` (the paper's best) the student learns the teacher's *decision*:

    L = (1 - w) · CE(z_cls, y) + w · CE(z_dist, argmax z_t),     w = 1/2

and with ``kind: soft`` the usual soft-target KD (Hinton et al. 2015) with the paper's λ=0.1, τ=3:

    L = (1 - w) · CE(z_cls, y) + w · τ² · KL(softmax(z_t/τ) ‖ softmax(z_dist/τ)),   w = 0.1

A student with a distillation token (``student=deit_tiny``, :class:`~compresslab.models.DeiT`)
feeds the class head's logits ``z_cls`` to the label term and the distillation head's ``z_dist``
to the teacher term, read through forward taps on its ``heads`` and ``head_dist`` modules; its
output (what is evaluated and saved) is the average of the two heads, the paper's inference rule.
A student without one (``student=vit_tiny``, or any other model) uses its output logits for both
terms: the paper's "class token only" distillation. The teacher may be a convnet
(``teacher=convnet``) or a transformer (``teacher=vit_small``); the paper's teacher comparison
(Table 3 as the issue cites it; §5.1 "Convnets teachers") finds that a convnet teacher gives a better
student than a transformer teacher of similar accuracy, which it ascribes to the inductive bias
of the convnet inherited through distillation (Abnar et al. 2020), and uses a RegNetY-16GF teacher
everywhere after that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.data.regime import labelled_cross_entropy
from compresslab.distill.losses import LogitLoss
from compresslab.distill.losses_logit import KDLoss
from compresslab.distill.module import DistillationModule
from compresslab.distill.taps import capture
from compresslab.errors import ConfigError

__all__ = ["HardLabelLoss", "DeiTDistillation"]

#: The paper's weight of the teacher term per kind (§5.1: λ=0.1 soft; 1/2 hard).
PAPER_WEIGHT = {"hard": 0.5, "soft": 0.1}
TOKEN_TAPS = ("heads", "head_dist")


class HardLabelLoss(LogitLoss):
    """Hard-label distillation (Touvron et al. 2021, Eq. 3): cross-entropy of the student's
    logits against the teacher's argmax, optionally label-smoothed (the paper's ε=0.1 variant)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ConfigError(f"distill.teacher_label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, student, teacher, *, target=None, epoch=0):
        return F.cross_entropy(student, teacher.detach().argmax(1), label_smoothing=self.label_smoothing)


class DeiTDistillation(DistillationModule):
    """DeiT's hard or soft distillation, through the distillation token when the student has one
    (see the module docstring for the loss and its weights).

    Args:
        kind: ``hard`` (teacher argmax) or ``soft`` (KD on the teacher's softened distribution).
        distill_weight: ``w``, the teacher term's weight (the label term gets ``1 - w``); None: the
            paper's 0.5 for hard, 0.1 for soft.
        temperature: τ of the soft kind (paper: 3).
        teacher_label_smoothing: label smoothing of the teacher's hard labels (hard kind).
        The rest as :class:`~compresslab.distill.module.DistillationModule` (no feature losses).
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, num_classes: int, kind: str = "hard",
                 distill_weight: float | None = None, temperature: float = 3.0,
                 teacher_label_smoothing: float = 0.0, **kwargs) -> None:
        if kind not in PAPER_WEIGHT:
            raise ConfigError(f"distill.kind must be 'hard' or 'soft', got {kind!r}")
        w = PAPER_WEIGHT[kind] if distill_weight is None else float(distill_weight)
        if not 0.0 <= w <= 1.0:
            raise ConfigError(f"distill.distill_weight must be in [0, 1] (null: the paper's {PAPER_WEIGHT[kind]}), "
                              f"got {distill_weight}")
        loss = HardLabelLoss(teacher_label_smoothing) if kind == "hard" else KDLoss(temperature)
        super().__init__(model, teacher, num_classes, ce_weight=1.0 - w, kd_weight=w, logit_loss=loss, **kwargs)
        self.kind = kind
        self.token = isinstance(getattr(model, "head_dist", None), nn.Module) and hasattr(model, "heads")

    def distill_terms(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None):
        """``(loss, student output, terms)``; the two heads feed the two terms when there is a token."""
        if not self.token:
            return super().distill_terms(x, y, index)
        t_logits, _ = self.frozen_teacher.outputs(x, index)
        with capture(self.model, TOKEN_TAPS) as heads:
            logits = self.model(x)
        ce = labelled_cross_entropy(heads["heads"], y, label_smoothing=self.label_smoothing)
        kd = self.logit_loss(heads["head_dist"], t_logits, target=y, epoch=self._epoch())
        return self.ce_weight * ce + self.kd_weight * kd, logits, {"ce": ce, "kd": kd}
