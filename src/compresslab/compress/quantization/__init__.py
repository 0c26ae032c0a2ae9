"""Int8 quantization: PT2E static / dynamic PTQ and QAT (:mod:`.pt2e` is the PT2E flow, the
artifact format is :mod:`compresslab.compress.codecs.int8_pt2e`), and ONNX Runtime's own
static int8 (:mod:`.ort_int8`)."""

from compresslab.compress.quantization.ptq import DynamicInt8, PTQInt8
from compresslab.compress.quantization.qat import QATCallback, QATInt8

__all__ = ["PTQInt8", "DynamicInt8", "QATInt8", "QATCallback"]
