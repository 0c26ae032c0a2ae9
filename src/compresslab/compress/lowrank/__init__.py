"""The ``lowrank`` axis (``conf/lowrank/``): :mod:`.svd` (``svd``) and :mod:`.tucker_cp`
(``tucker``, ``cp``) with the tensorly decompositions in :mod:`.tensor_decomp`; the factorized
layers and their plain-data plan, shared by both, in :mod:`.factorized`. Artifact format:
:mod:`compresslab.compress.codecs.lowrank`."""
