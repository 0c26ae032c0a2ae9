"""Pruning: unstructured masks (magnitude, AGP, regularize-then-cut, lottery rewinding) and
structured channel removal (torch-pruning's criteria; Network Slimming), as Lightning callbacks on the student; sensitivity analysis.

Configs live in ``conf/prune/``; each names one of these :class:`CompressionMethod` classes.
Importing this package registers the ``compresslab.sparse/1`` and
``compresslab.structured/1`` artifact formats.
"""

from compresslab.compress.pruning.slimming import NetworkSlimming
from compresslab.compress.pruning.sensitivity import SensitivityAnalysis, layer_sensitivity, write_sensitivity
from compresslab.compress.pruning.structured import StructuredPruning, prune_channels, resize_to_state_dict
from compresslab.compress.pruning.unstructured import (
    AGPPruning,
    L1ThresholdPruning,
    MagnitudePruning,
    UnstructuredPruning,
    agp_sparsity,
    magnitude_masks,
)

__all__ = [
    "AGPPruning",
    "L1ThresholdPruning",
    "MagnitudePruning",
    "NetworkSlimming",
    "SensitivityAnalysis",
    "StructuredPruning",
    "UnstructuredPruning",
    "agp_sparsity",
    "layer_sensitivity",
    "magnitude_masks",
    "prune_channels",
    "resize_to_state_dict",
    "write_sensitivity",
]
