"""Measurements on models and artifacts: parameters, sparsity, MACs, size, latency, accuracy."""

from compresslab.measure.core import (
    count_macs,
    count_params,
    evaluate_accuracy,
    file_size,
    measure_latency,
    interleaved_latency,
    profile,
    profile_many,
)

__all__ = ["count_macs", "count_params", "evaluate_accuracy", "file_size", "measure_latency", "profile",
           "interleaved_latency", "profile_many"]
