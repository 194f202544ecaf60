"""The one table of output formats: file extensions (muxer, default codec), HLS playlists and pipe containers.

It imports nothing heavy, so the command line can offer the choices without loading PyAV.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class FileFormat:
    name: str  # FFmpeg muxer
    codec: str  # default encoder


FILE_FORMATS = {
    ".mp4": FileFormat("mp4", "libx264"),
    ".mkv": FileFormat("matroska", "libx264"),
    ".webm": FileFormat("webm", "libvpx-vp9"),
}
HLS_EXTENSION = ".m3u8"  # an HLS playlist; its segments are files of HLS_FORMAT beside it
HLS_FORMAT = FileFormat("mpegts", "libx264")
PIPE_FORMATS = ("matroska", "nut", "mpegts", "rawvideo")

# What the error for an unknown output target also suggests.
OTHER_TARGETS = ", a .m3u8 for an HLS playlist, a directory/ for PNG frames, '-' for stdout, or an rtmp:// URL"
_EXTENSIONS = ", ".join(list(FILE_FORMATS)[:-1]) + " or " + list(FILE_FORMATS)[-1]  # .mp4, .mkv or .webm


def dotted(ext: str) -> str:
    """``ext`` with a leading dot ("mkv" -> ".mkv"); "" stays ""."""
    return ext if ext.startswith(".") or not ext else "." + ext


def find_file_format(ext: str) -> FileFormat | None:
    """The format of a file extension (with or without the dot, any case), None if unsupported."""
    return FILE_FORMATS.get(dotted(ext).lower())


def file_format(ext: str, what: str = "output", where: str | os.PathLike | None = None, advice: str = "") -> FileFormat:
    """The format of a file extension; a ``SinkError`` naming the ``what`` extension (``in where``) if unsupported."""
    fmt = find_file_format(ext)
    if fmt is None:
        from .base import SinkError  # here, so that reading the table does not load PyAV

        place = "" if where is None else f" in {where}"
        raise SinkError(f"unsupported {what} extension {dotted(ext) or '(none)'!r}{place}; use {_EXTENSIONS}{advice}")
    return fmt


def check_pipe_format(fmt: str) -> None:
    """Refuse a pipe container not in ``PIPE_FORMATS``."""
    if fmt not in PIPE_FORMATS:
        from .base import SinkError  # here, so that reading the table does not load PyAV

        raise SinkError(f"unsupported pipe format {fmt!r}; use one of {', '.join(PIPE_FORMATS)}")
