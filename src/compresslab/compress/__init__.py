"""Compression methods: Lightning callbacks (during training) and post-training transforms."""

from compresslab.compress.base import CompressionMethod, build_methods

__all__ = ["CompressionMethod", "build_methods"]
