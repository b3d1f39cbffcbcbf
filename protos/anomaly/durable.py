"""Durable files, the way every side writes them (the SDK's hot folder, the server's spool
and model cache): a write is complete and on disk, or absent; never torn.

`write_atomic` writes a temporary file in the same folder, fsyncs it, renames it over the
target and fsyncs the folder (so the rename survives a power cut too); `fsync_dir` is the
last step alone, for callers that move files themselves.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(folder: Path | str) -> None:
    """Make the folder's entries (creations, renames, deletions) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path | str, data: bytes | str) -> None:
    """Replace `path` with `data`, durably and atomically (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
