"""Writing files so that a crash or a full disk never leaves a torn file or a temp file behind.

Every file compresslab writes (artifacts, teacher cache, results.json, Lightning
checkpoints) goes through :func:`atomic_write_bytes`: the bytes go to a temp file in the
target's own directory (so the rename stays on one filesystem), which is then renamed over
the target. A reader sees the old file or the new one, never half of one. The temp file is
created with the process umask's mode (like ``open``), not ``mkstemp``'s 0600, so a shared
teacher cache stays readable by the group.
"""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, then ``os.replace``).

    On any error (``ENOSPC`` included) the temp file is removed and the error re-raised;
    the target keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode & ~umask
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` of ``obj`` to ``path`` through :func:`atomic_write_bytes`.

    The object is serialized in memory first, so the zip archive inside is named ``archive``
    (as for any in-memory ``torch.save``) rather than after the temp file, which keeps the
    container small and the same whatever the file is called.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(Path(path), buffer.getbuffer())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic saves: a full disk or a kill mid-save leaves
    the previous ``best.ckpt`` / ``last.ckpt`` in place instead of a torn file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, Path(path))
