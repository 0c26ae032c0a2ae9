"""The two bases of the distillation losses; the methods live in ``losses_<family>.py``.

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

The families: logit losses (``losses_logit``: KD, LSKD, DKD; ``losses_relational``: DIST), feature-map
losses (``losses_maps``: FitNets, AT, VID, AB, FSP, NST; ``losses_ofd``; ``losses_review``; ``losses_factor``:
FT), relational losses (``losses_relational``: SP, PKT, RKD, CC) and ``losses_crd`` (CRD).

To add a method: subclass :class:`FeatureLoss` (or :class:`LogitLoss`), implement
``forward``, set the class flags, and write ``conf/distill/<name>.yaml`` naming it.
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch
from torch import nn

__all__ = ["LogitLoss", "FeatureLoss"]


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
