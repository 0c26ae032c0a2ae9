"""Knowledge distillation: the teacher → student LightningModule and the catalogue of losses.

``distill=<method>`` (conf/distill/) instantiates :class:`DistillationModule` with one
logit loss (KD, DKD, KD with logit standardization, DIST) and/or feature losses (FitNets,
AT, SP, PKT, RKD, CRD, CC, VID, AB, FT, FSP, NST, OFD, ReviewKD) captured at module-path
taps; combinations are just configs that name several of them. Methods with a stage before
the main fit (FitNets, AB, FSP, FT) run it as a Lightning fit of its own
(:mod:`compresslab.distill.stages`). See docs/distillation.md.

The files: ``module`` (the LightningModule, composing the rest), ``loss_config`` (a feature-loss
entry, validated by its fields), ``wiring`` (taps, adapters and loss state against the two networks),
``taps`` / ``tap_probe`` (capturing taps; resolving the special ones), ``adapters``, ``frozen_teacher``
(the teacher's device, eval mode and outputs), ``cache`` (the teacher-output cache), ``stages``, and
``losses`` (the two bases) with one ``losses_<family>`` file per family of methods.
"""

from compresslab.distill.adapters import FeatureAdapter
from compresslab.distill.losses import FeatureLoss, LogitLoss
from compresslab.distill.losses_crd import CRDLoss
from compresslab.distill.losses_factor import FTLoss
from compresslab.distill.losses_logit import DKDLoss, KDLoss, LSKDLoss, ReverseKLLoss
from compresslab.distill.losses_maps import ABLoss, ATLoss, FSPLoss, HintLoss, NSTLoss, VIDLoss
from compresslab.distill.losses_ofd import OFDLoss
from compresslab.distill.losses_relational import CCLoss, DISTLoss, PKTLoss, RKDLoss, SPLoss
from compresslab.distill.losses_review import ReviewKDLoss
from compresslab.distill.module import DistillationModule, TeacherOutputCache
from compresslab.distill.tap_probe import probe

__all__ = [
    "DistillationModule",
    "TeacherOutputCache",
    "FeatureAdapter",
    "probe",
    "LogitLoss",
    "FeatureLoss",
    "KDLoss",
    "LSKDLoss",
    "DKDLoss",
    "ReverseKLLoss",
    "HintLoss",
    "ATLoss",
    "SPLoss",
    "PKTLoss",
    "RKDLoss",
    "CRDLoss",
    "CCLoss",
    "DISTLoss",
    "VIDLoss",
    "ABLoss",
    "FTLoss",
    "FSPLoss",
    "NSTLoss",
    "OFDLoss",
    "ReviewKDLoss",
]
