"""One process per run directory, and what a signal that stops a run leaves behind.

:class:`RunDirLock` holds an exclusive ``fcntl.flock`` on ``<run dir>/.compresslab.lock`` for a
job's whole life, so a second process started into the same ``hydra.run.dir`` is refused at once
(its results.json, checkpoints and artifacts would otherwise interleave with the first's). The
lock belongs to the open file: the operating system releases it when the holder exits or is
killed (even by SIGKILL), so no stale lock ever needs deleting by hand. The pid written into the
file is only for the message.

:func:`as_interrupted` turns Lightning's ``SIGTERMException`` (a ``SystemExit`` with no code, which
a scheduler would read as success) into :class:`~compresslab.errors.Interrupted`: a failure with a
message saying where the checkpoints are and how to resume, and a non-zero exit status.
"""

from __future__ import annotations

import fcntl
import os
import signal
from pathlib import Path

from compresslab.errors import Interrupted, RunDirBusy

LOCK_NAME = ".compresslab.lock"


class RunDirLock:
    """Context manager: an exclusive, non-blocking lock on a run directory (module doc)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(
                f"{self.path.parent} is in use by another compresslab process (pid {holder}): two jobs in one run "
                "directory would write the same checkpoints and results.json. Wait for it to finish, or start this "
                "one with another hydra.run.dir (or paths.run_dir).") from None
        try:  # the pid is only for the message: a full disk must not stop the run here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def as_interrupted(exc: BaseException, run_dir: Path) -> Interrupted | None:
    """An :class:`Interrupted` for a run stopped by SIGTERM (Lightning's ``SIGTERMException``) or
    Ctrl-C, saying how to resume; None for any other exception."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    if isinstance(exc, SIGTERMException):
        signum = signal.SIGTERM
    elif isinstance(exc, KeyboardInterrupt):
        signum = signal.SIGINT
    else:
        return None
    last = Path(run_dir) / "checkpoints" / "student" / "last.ckpt"
    where = f"the student's last checkpoint is {last}" if last.exists() else "no student checkpoint was written yet"
    return Interrupted(
        f"interrupted by {signum.name}; {where}. To resume, run the same command again with "
        f"hydra.run.dir={run_dir} (resume=true, the default): the teacher and the student continue from their "
        "last.ckpt (each written at the end of an epoch).", exit_code=128 + int(signum))
