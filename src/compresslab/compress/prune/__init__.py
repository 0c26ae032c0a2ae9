"""Pruning: unstructured masks (magnitude, AGP, regularize-then-cut, lottery rewinding, N:M), one-shot
post-training pruning of Linear layers from calibration inputs (Wanda, SparseGPT) and
structured channel removal (torch-pruning's criteria; Network Slimming; attention heads), as Lightning callbacks on the
student; sensitivity analysis.

Configs live in ``conf/prune/``; each names one of these :class:`CompressionMethod` classes.
Their artifact formats are :mod:`compresslab.compress.codecs.sparse` and
:mod:`compresslab.compress.codecs.structured`.
"""

from compresslab.compress.prune.channels import prune_channels
from compresslab.compress.prune.heads import HeadPruning
from compresslab.compress.prune.magnitude import MagnitudePruning
from compresslab.compress.prune.nm import NMPruning
from compresslab.compress.prune.masks import agp_sparsity, magnitude_masks
from compresslab.compress.prune.sensitivity import SensitivityAnalysis, layer_sensitivity, write_sensitivity
from compresslab.compress.prune.slimming import NetworkSlimming
from compresslab.compress.prune.sparsegpt import SparseGPTPruning
from compresslab.compress.prune.structured import StructuredPruning
from compresslab.compress.prune.unstructured import AGPPruning, L1ThresholdPruning, UnstructuredPruning
from compresslab.compress.prune.wanda import WandaPruning
from compresslab.compress.structure import resize_to_state_dict

__all__ = [
    "AGPPruning",
    "HeadPruning",
    "L1ThresholdPruning",
    "MagnitudePruning",
    "NMPruning",
    "NetworkSlimming",
    "SensitivityAnalysis",
    "SparseGPTPruning",
    "StructuredPruning",
    "UnstructuredPruning",
    "WandaPruning",
    "agp_sparsity",
    "layer_sensitivity",
    "magnitude_masks",
    "prune_channels",
    "resize_to_state_dict",
    "write_sensitivity",
]
