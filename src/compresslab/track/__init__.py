"""Tracking: results.json, Weights & Biases glue and the terminal summary."""

from compresslab.track.results import base_record, read_results, write_results

__all__ = ["base_record", "read_results", "write_results"]
