"""Exceptions that carry a message telling the user what to do."""


class ConfigError(ValueError):
    """A configuration that cannot work (unknown name, impossible combination, wrong type)."""


class DatasetNotFoundError(FileNotFoundError):
    """Dataset files are missing and downloading was not requested."""


class CheckpointError(FileNotFoundError):
    """A checkpoint or artifact is missing or not in a format compresslab can load safely."""


class Interrupted(RuntimeError):
    """The run was stopped by a signal (SIGTERM, SIGINT); the message says how to resume it.
    The ``compresslab`` command exits with :attr:`exit_code` (128 + the signal number)."""

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = int(exit_code)


class RunDirBusy(ConfigError):
    """Another live process is running a job in the same run directory."""


class TrainingDiverged(RuntimeError):
    """A fit produced a non-finite loss or non-finite weights, or ran no training step at all."""
