"""The ``fuse`` axis (``conf/fuse/``): :mod:`.bn` (``bn``, BatchNorm folded into conv/linear).
Artifact format: :mod:`compresslab.compress.codecs.fuse_bn`."""
