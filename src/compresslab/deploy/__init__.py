"""Deployment: ONNX export of every artifact, the export check, ONNX Runtime as a measured backend.

- :mod:`compresslab.deploy.export`: ``student.onnx`` beside ``student.pt`` (dynamo exporter,
  dynamic batch), in the form the artifact's codec declares (:class:`compresslab.artifact.Codec`);
- :mod:`compresslab.deploy.check`: the exported graph against the torch artifact in a fresh
  process (max abs logit difference, top-1 agreement, accuracy in ONNX Runtime);
- :mod:`compresslab.deploy.step`: the pipeline's export step and backend wiring.

ONNX Runtime sessions, the exporter and the ONNX interpreter are the leaf package
:mod:`compresslab.runtime`, shared with :mod:`compresslab.measure` and the codecs.
"""
