"""Output targets as the user names them: "-", an rtmp(s):// URL, a directory/, an .m3u8 playlist or a video file."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Sequence

from .base import Sink, SinkError
from .file import FileSink, check_file_target
from .formats import HLS_EXTENSION, find_file_format
from .hls import HlsSink, check_playlist_target
from .pipe import PipeSink
from .png import PngSink
from .rtmp import RTMPSink


def target_kind(target: str) -> str:
    """What an output target names: "pipe" ("-"), "rtmp" (URL), "png" (directory), "hls" (.m3u8) or "file"."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", target)
    if target == "-":
        return "pipe"
    if scheme:
        if scheme.group(1).lower() not in ("rtmp", "rtmps"):
            raise SinkError(f"unsupported output URL scheme {scheme.group(1)}://; use rtmp:// or rtmps://, a file path, a directory/ or '-'")
        return "rtmp"
    path = Path(target)
    if target.endswith(("/", os.sep)):
        return "png"
    if path.suffix.lower() == HLS_EXTENSION:
        return "hls"
    if path.is_dir() and find_file_format(path.suffix) is None:
        return "png"
    return "file"


def validate_target(target: str) -> str:
    """Check an output target without opening it (nothing is created); returns its kind."""
    kind = target_kind(target)
    if kind not in ("file", "png", "hls"):
        return kind
    path = Path(target)
    if kind == "file":
        check_file_target(path, path.suffix, target)
    elif kind == "hls":
        check_playlist_target(path)
    existing = (path if kind == "png" else path.parent).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SinkError(f"cannot write output {target}: {existing} is not a writable directory; choose a writable location")
    return kind


def validate_targets(targets: Sequence[str], segments: str | os.PathLike) -> None:
    """Check every target, and that they can be written side by side: one stdout stream at most,
    no file or URL twice, one HLS playlist per directory (their segment names would collide),
    nothing inside the run directory's ``segments`` (fifo-stream's own)."""
    kinds = [validate_target(target) for target in targets]
    if kinds.count("pipe") > 1:
        raise SinkError(f"'--out -' is given {kinds.count('pipe')} times, but stdout carries one stream; keep one '-' and add files or URLs for more outputs")
    segments = Path(segments).absolute()
    seen: dict[str, str] = {}
    playlists: dict[str, str] = {}
    for target, kind in zip(targets, kinds):
        key = target if kind == "rtmp" else os.path.normpath(Path(target).absolute())
        if key in seen:
            raise SinkError(f"--out {target} and --out {seen[key]} name the same output; give each output its own path")
        seen[key] = target
        if kind == "hls" and (other := playlists.setdefault(str(Path(key).parent), target)) != target:
            raise SinkError(f"--out {target} and --out {other} are HLS playlists in one directory; give each its own directory")
        if kind in ("file", "png", "hls") and Path(key).is_relative_to(segments):
            raise SinkError(f"--out {target} is inside the run directory's {segments.name}/, which fifo-stream manages; write it elsewhere")


def open_sink(target: str, width: int, height: int, fps: float, **options) -> Sink:
    """Open the sink a target names: "-" (stdout), rtmp(s):// URL, directory/ (PNG frames), .m3u8 (HLS), or a video file.

    ``options`` go to the sink's constructor; one that the sink does not take is a ``SinkError``.
    """
    kind = target_kind(target)
    cls, args = {
        "pipe": (PipeSink, (width, height, fps)),
        "rtmp": (RTMPSink, (target, width, height, fps)),
        "png": (PngSink, (target, width, height)),
        "hls": (HlsSink, (target, width, height, fps)),
        "file": (FileSink, (target, width, height, fps)),
    }[kind]
    try:
        inspect.signature(cls).bind(*args, **options)
    except TypeError as e:
        raise SinkError(f"option not valid for {cls.__name__} output {target!r} ({e})") from None
    return cls(*args, **options)
