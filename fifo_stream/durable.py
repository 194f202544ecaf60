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


def durable_replace(tmp: str | os.PathLike, path: str | os.PathLike, before_rename=None) -> None:
    """Move the finished file ``tmp`` to ``path`` so that a crash leaves either the old or the new file.

    ``tmp`` is flushed to stable storage, renamed over ``path``, and the directory entry
    flushed. ``before_rename`` is called once the new content is durable but not yet in place.
    """
    fsync(tmp)
    if before_rename:
        before_rename()
    os.replace(tmp, path)
    fsync(Path(path).parent, directory=True)


def atomic_write(path: str | os.PathLike, data: bytes, before_rename=None, *, tmp: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new content.

    The data goes first to ``tmp`` (by default ``path`` + ``.tmp``), then :func:`durable_replace`
    moves it into place; ``before_rename`` is called once the new content is durable but not yet in place.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp") if tmp is None else tmp
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        durable_replace(tmp, path, before_rename)
    except OSError:
        Path(tmp).unlink(missing_ok=True)  # a half-written file must not take the space the next try needs
        raise
