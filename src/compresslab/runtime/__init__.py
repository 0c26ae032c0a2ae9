"""Runtimes a saved model runs in besides torch: a leaf package (imports nothing of compresslab
above ``errors``), used by ``deploy/`` (export and check), ``measure/`` (timing) and the codecs.

- :mod:`.onnx_export`: a torch module to ONNX bytes (dynamo exporter, dynamic batch);
- :mod:`.ort`: ONNX Runtime sessions and the callable the latency engine times;
- :mod:`.interpret`: an ONNX graph run with torch ops (``quant=ort_int8``'s torch form).
"""
