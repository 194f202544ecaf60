"""Where generated frames go: files, pipes, RTMP servers, HLS playlists, PNG frames, and resumable segments.

Every sink takes frames one at a time as uint8 numpy arrays of shape (H, W, 3), RGB, and
encodes them with PyAV. Files are written so that a process killed mid-write leaves a
playable file (fragmented MP4, Matroska). ``BackgroundSink`` moves encoding off the
generator's thread; ``SegmentWriter`` and ``join_segments`` give exact resume.

The public names below are loaded from their modules on first use, so that importing
``fifo_stream.outputs.formats`` (as the command line does) does not load PyAV.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "Sink": "base",
    "SinkError": "base",
    "SinkClosed": "base",
    "FileSink": "file",
    "PipeSink": "pipe",
    "RTMPSink": "rtmp",
    "PngSink": "png",
    "HlsSink": "hls",
    "BackgroundSink": "workers",
    "MultiSink": "workers",
    "SegmentWriter": "segments",
    "find_segments": "segments",
    "join_segments": "segments",
    "open_sink": "targets",
    "target_kind": "targets",
    "validate_target": "targets",
}
__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
