"""Deployment: ONNX export of every artifact, the export check, ONNX Runtime as a measured backend.

- :mod:`compresslab.deploy.export`: ``student.onnx`` beside ``student.pt`` (dynamo exporter,
  dynamic batch), int8 as a QDQ graph with our PT2E scales;
- :mod:`compresslab.deploy.check`: the exported graph against the torch artifact in a fresh
  process (max abs logit difference, top-1 agreement, accuracy in ONNX Runtime);
- :mod:`compresslab.runtime.ort`: sessions and the callable the latency engine times;
- :mod:`compresslab.deploy.step`: the pipeline's export step and backend wiring;
- :mod:`compresslab.runtime.interpret`: an ONNX graph run with torch ops (``quant=ort_int8``'s torch form).
"""
