"""Frames to a binary stream such as stdout, as a streamable container or raw rgb24."""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from typing import BinaryIO, Iterator

import av
import numpy as np

from .base import _AV_ERRORS, Sink, SinkClosed, SinkError, _check_frame, _check_size, _codec_options, _rate, _reason, _VideoOut, default_gop
from .formats import check_pipe_format


def _is_broken_pipe(exc: BaseException | None) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return True
        if getattr(exc, "errno", None) in (errno.EPIPE, errno.ECONNRESET):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class PipeSink(Sink):
    """Frames to a binary stream (stdout by default) as matroska, nut, mpegts, or raw rgb24.

    Nothing else may write to the stream meanwhile. ``rawvideo`` suits
    ``ffmpeg -f rawvideo -pix_fmt rgb24 -s WxH -r FPS -i -``. A consumer that goes away
    raises ``SinkClosed``.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        stream: BinaryIO | None = None,
        fmt: str = "matroska",
        codec: str = "libx264",
        crf: int = 18,
        preset: str = "veryfast",
        pix_fmt: str = "yuv420p",
        *,
        gop: int | None = None,
        codec_options: dict | None = None,
    ) -> None:
        check_pipe_format(fmt)
        self.stream = sys.stdout.buffer if stream is None else stream
        self.width, self.height, self.fmt = width, height, fmt
        self.frames = 0
        self._out: _VideoOut | None = None
        self._open = True
        if getattr(self.stream, "isatty", lambda: False)():
            raise SinkError("refusing to write binary video to a terminal; pipe the output into a program such as ffmpeg or ffplay")
        if fmt == "rawvideo":
            return
        _check_size(width, height, pix_fmt)
        _rate(fps)  # rejects fps <= 0 before anything is opened
        with self._guard("opening"):
            container = av.open(self.stream, "w", format=fmt, container_options={"flush_packets": "1"})
            self._out = _VideoOut(
                container, width, height, fps, codec, pix_fmt,
                _codec_options(codec, crf, preset, None, codec_options), gop or default_gop(fps),
            )
            self.stream.flush()

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        try:
            yield
        except SinkError:
            raise
        except _AV_ERRORS as e:
            if _is_broken_pipe(e):
                self._consumer_gone()
                raise SinkClosed(
                    "the program reading the output pipe went away; stopped writing frames "
                    "(keep the reader running until the stream ends)"
                ) from None
            raise SinkError(f"{doing} the {self.fmt} pipe failed ({_reason(e)})") from None

    def _consumer_gone(self) -> None:
        self._open = False
        if self._out is not None:
            self._out.abandon()
            self._out = None
        # Point the descriptor at /dev/null so that flushing the stream's buffer at
        # interpreter exit does not print a BrokenPipeError.
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    def write(self, frame: np.ndarray) -> None:
        if not self._open:
            raise SinkClosed("the pipe is closed; no more frames can be written")
        array = _check_frame(frame, self.width, self.height)
        with self._guard("writing to"):
            if self._out is None:
                self.stream.write(memoryview(array).cast("B"))
            else:
                self._out.encode(array, self.frames)
            self.stream.flush()
        self.frames += 1

    def close(self) -> None:
        if not self._open:
            return
        with self._guard("closing"):
            self._open = False
            if self._out is not None:
                out, self._out = self._out, None
                out.finish()
            self.stream.flush()
