"""Crash-safe file primitives: fsync and atomic replacement."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file (or a directory entry list, with ``directory``) to stable storage."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open directories; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, before_rename=None) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new content.

    ``before_rename`` is called once the new content is durable but not yet in place.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if before_rename:
        before_rename()
    os.replace(tmp, path)
    fsync(path.parent, directory=True)
