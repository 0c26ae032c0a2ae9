"""Exceptions that carry a message telling the user what to do."""


class ConfigError(ValueError):
    """A configuration that cannot work (unknown name, impossible combination, wrong type)."""


class DatasetNotFoundError(FileNotFoundError):
    """Dataset files are missing and downloading was not requested."""


class CheckpointError(FileNotFoundError):
    """A checkpoint or artifact is missing or not in a format compresslab can load safely."""
