"""Atomic file writes: a reader, or a process killed mid-write, sees the old file or the new one, never a torn one.

The content goes to a temporary file in the target's own folder (a rename is atomic only within one file
system), is flushed and fsynced, then ``os.replace`` puts it over the target; the folder is fsynced last, since
the rename itself is durable only once the directory entry is on disk. Temporary files are named
``.<name>.<random>.tmp``, so a listing that matches the target's pattern (``checkpoint_*.pt``) never sees them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[IO[bytes]], object]) -> None:
    """Writes ``path`` atomically through ``write_fn``.

    Args:
        path: destination file; its folder is created if needed.
        write_fn: called once with the temporary file opened for binary writing (``torch.save(state, f)``,
            ``f.write(text.encode())``); its return value is ignored.

    If ``write_fn`` (or anything up to the rename) raises, the temporary file is removed, ``path`` keeps its
    old content and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
