"""Test helpers that ship with compresslab (the local SLURM cluster the test suite runs against)."""
