"""Video files written so that a process killed mid-write leaves a playable file (fragmented MP4, Matroska)."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from .base import _AV_ERRORS, Sink, SinkError, _check_frame, _check_size, _codec_options, _finish, _make_dir, _rate, _reason, _VideoOut, default_gop
from .formats import OTHER_TARGETS, FileFormat, dotted, file_format

# delay_moov postpones the moov box until the first fragment, so it can carry the edit list
# that makes the first pts 0 when the encoder uses B-frames.
MP4_MOVFLAGS = "frag_keyframe+empty_moov+delay_moov+default_base_moof"


def check_file_target(path: Path, suffix: str, where: str | os.PathLike) -> FileFormat:
    """The format of a video file output with this suffix; refuses an unsupported one and an existing directory."""
    fmt = file_format(suffix, where=where, advice=OTHER_TARGETS)
    if path.is_dir():
        raise SinkError(f"output path {path} is a directory; give a file name such as {path / ('out' + suffix)}")
    return fmt


def _container_options(muxer: str, gop: int, fps: float) -> dict[str, str]:
    options = {"flush_packets": "1"}
    if muxer == "mp4":
        options["movflags"] = MP4_MOVFLAGS
    else:
        # Matroska holds a cluster in memory until it closes; by default that is only
        # every 5 s, or at a keyframe once the cluster exceeds 4 KiB.
        options["cluster_time_limit"] = str(max(1, round(1000 * gop / fps)))
    return options


class FileSink(Sink):
    """A crash-tolerant video file: fragmented .mp4, .mkv, or .webm (VP9 by default).

    ``ext`` overrides the container chosen from the path's suffix (e.g. for a ``.partial``
    name). ``gop`` defaults to 2 s of frames, which bounds what a crash can lose.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: float,
        codec: str | None = None,
        crf: int = 18,
        preset: str = "veryfast",
        pix_fmt: str = "yuv420p",
        *,
        gop: int | None = None,
        ext: str | None = None,
        codec_options: dict | None = None,
    ) -> None:
        self.path = Path(path)
        self.width, self.height = width, height
        self.frames = 0
        suffix = dotted((ext or self.path.suffix).lower())
        fmt = check_file_target(self.path, suffix, self.path)
        _check_size(width, height, pix_fmt)
        _rate(fps)  # rejects fps <= 0 before anything is opened
        _make_dir(self.path.parent, "output")
        codec = codec or fmt.codec
        gop = gop or default_gop(fps)
        try:
            container = av.open(str(self.path), "w", format=fmt.name, container_options=_container_options(fmt.name, gop, fps))
            self._out: _VideoOut | None = _VideoOut(
                container, width, height, fps, codec, pix_fmt, _codec_options(codec, crf, preset, None, codec_options), gop
            )
        except SinkError:
            raise
        except _AV_ERRORS as e:
            raise SinkError(f"cannot write {self.path} ({_reason(e)}); check that the directory is writable") from None

    def write(self, frame: np.ndarray) -> None:
        if self._out is None:
            raise SinkError(f"{self.path} is already closed")
        array = _check_frame(frame, self.width, self.height)
        try:
            self._out.encode(array, self.frames)
        except _AV_ERRORS as e:
            raise SinkError(f"writing {self.path} failed ({_reason(e)}); check free disk space") from None
        self.frames += 1

    def close(self) -> None:
        out, self._out = self._out, None
        _finish(out, f"finishing {self.path}", "; check free disk space")
