"""The ablation axes: the Hydra config groups a sweep varies, defined once.

Each axis is a config group in ``conf/`` whose chosen option's ``name`` labels the run
(results.json ``axes``, the report's ``--rows`` / ``--cols``, the W&B run config). The
compression axes are the groups whose option is a :class:`~compresslab.compress.base.CompressionMethod`;
the pipeline applies them in the order written here, and each method's own numbers go to
``student.<axis>`` in results.json. Adding an axis is a config group plus one name below
(see docs/architecture.md).
"""

#: compression axes, in the order their methods are applied (lowrank → prune → quant → fuse)
COMPRESSION_AXES = ("lowrank", "prune", "quant", "fuse")

#: every ablation axis: the run's data and models, then its compression
AXES = ("dataset", "teacher", "student", "distill", *COMPRESSION_AXES)
