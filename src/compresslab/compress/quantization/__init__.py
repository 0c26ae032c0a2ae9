"""Int8 quantization (PT2E static/dynamic PTQ, QAT) and the helpers shared with the low-bit,
weight-sharing and low-rank methods. Importing this package registers the int8 artifact loader."""

from compresslab.compress.quantization.pt2e import INT8_FORMAT, Int8Model, load_int8_payload
from compresslab.compress.quantization.ptq import DynamicInt8, PTQInt8
from compresslab.compress.quantization.qat import QATCallback, QATInt8

__all__ = ["INT8_FORMAT", "Int8Model", "load_int8_payload", "PTQInt8", "DynamicInt8", "QATInt8", "QATCallback"]
