"""Measurements on models and artifacts: parameters, sparsity, MACs, size, latency, accuracy."""

from compresslab.measure.core import (
    count_macs,
    count_params,
    evaluate_accuracy,
    file_size,
    measure_latency,
    profile,
)

__all__ = ["count_macs", "count_params", "evaluate_accuracy", "file_size", "measure_latency", "profile"]
