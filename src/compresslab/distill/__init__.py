"""Knowledge distillation: the teacher → student LightningModule and the catalogue of losses.

``distill=<method>`` (conf/distill/) instantiates :class:`DistillationModule` with one
logit loss (KD, DKD, KD with logit standardization) and/or feature losses (FitNets,
AT, SP, PKT, RKD, CRD) captured at module-path taps; combinations are just configs
that name several of them. See docs/distillation.md.
"""

from compresslab.distill.losses import (
    ATLoss,
    CRDLoss,
    DKDLoss,
    FeatureLoss,
    HintLoss,
    KDLoss,
    LogitLoss,
    LSKDLoss,
    PKTLoss,
    RKDLoss,
    SPLoss,
)
from compresslab.distill.module import DistillationModule, TeacherOutputCache
from compresslab.distill.taps import FeatureAdapter, probe

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
    "HintLoss",
    "ATLoss",
    "SPLoss",
    "PKTLoss",
    "RKDLoss",
    "CRDLoss",
]
