"""compresslab: model compression experiments as Hydra-configured Lightning jobs.

The pieces stand alone: models (``compresslab.models``), datamodules
(``compresslab.data``), the training module (``compresslab.train``), measurement
(``compresslab.measure``) and tracking (``compresslab.track``) can be imported
without the CLI.
"""

__version__ = "0.1.0"
