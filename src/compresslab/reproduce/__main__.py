"""``python -m compresslab.reproduce``: the same as ``compresslab-reproduce``."""

import sys

from compresslab.cli import reproduce_main

sys.exit(reproduce_main())
