"""What every sink shares: the ``Sink`` interface, its errors, and the PyAV encoder helpers.

Every sink takes frames one at a time as uint8 numpy arrays of shape (H, W, 3), RGB.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import FifoStreamError

_AV_ERRORS = (av.FFmpegError, OSError, ValueError)


class SinkError(FifoStreamError):
    """An output cannot be opened or written."""


class SinkClosed(SinkError):
    """The consumer of a pipe went away; nothing more can be written."""

    exit_code = 3


class Sink(ABC):
    """A destination for RGB frames; use as a context manager or call ``close()``."""

    @abstractmethod
    def write(self, frame: np.ndarray) -> None:
        """Write one (H, W, 3) uint8 RGB frame."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the output; safe to call more than once."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message."""
    text = str(exc).strip() or type(exc).__name__
    return re.sub(r"^\[Errno -?\d+\] ", "", text.splitlines()[0])


def _rate(fps: float) -> Fraction:
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise SinkError(f"fps must be positive, got {fps}; pass a frame rate such as 8")
    return rate


def default_gop(fps: float) -> int:
    """The keyframe interval when none is given: 2 s of frames, which bounds what a crash can lose."""
    return max(1, round(2 * fps))


def _make_dir(directory: Path, what: str) -> None:
    """Create ``directory`` (and its parents) if missing; a failure is a SinkError naming it as the ``what`` directory."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SinkError(f"cannot create {what} directory {directory} ({e.strerror}); choose a writable location") from None


def _check_size(width: int, height: int, pix_fmt: str) -> None:
    if width <= 0 or height <= 0:
        raise SinkError(f"frame size must be positive, got {width}x{height}")
    if pix_fmt.startswith(("yuv420", "yuvj420", "nv12")) and (width % 2 or height % 2):
        raise SinkError(
            f"{pix_fmt} needs an even width and height, got {width}x{height}; "
            "crop or pad the frames, or use pix_fmt yuv444p"
        )


def _check_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    array = np.asarray(frame)
    if array.dtype != np.uint8 or array.shape != (height, width, 3):
        raise SinkError(
            f"expected a uint8 RGB frame of shape ({height}, {width}, 3), got {array.dtype} {array.shape}; "
            "open the sink with the frame size the generator produces"
        )
    return np.ascontiguousarray(array)


def _codec_options(codec: str, crf: int, preset: str, tune: str | None, extra: dict | None) -> dict[str, str]:
    options: dict[str, str] = {}
    if codec in ("libx264", "libx265"):
        options.update(crf=str(crf), preset=preset)
        if tune:
            options["tune"] = tune
    elif codec.startswith("libvpx"):
        # b=0 selects constant-quality mode; realtime keeps VP9 faster than the generator.
        options.update({"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"})
    elif codec == "libsvtav1":
        options["crf"] = str(crf)
    options.update({k: str(v) for k, v in (extra or {}).items()})
    return options


class _VideoOut:
    """One encoded video stream in an output container; the output is opened at construction."""

    def __init__(
        self,
        container: av.container.OutputContainer,
        width: int,
        height: int,
        fps: float,
        codec: str,
        pix_fmt: str,
        codec_options: dict[str, str],
        gop: int,
    ) -> None:
        self.container = container
        try:
            self.stream = container.add_stream(codec, rate=_rate(fps))
        except (av.FFmpegError, ValueError):
            self.abandon()
            raise SinkError(f"codec {codec!r} cannot be used for {container.format.name} output; "
                            "use libx264, or libvpx-vp9 for .webm") from None
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, pix_fmt
        self.stream.codec_context.gop_size = gop
        self.stream.options = codec_options
        try:
            # Opening the encoder and the output now makes bad paths and servers fail before any frame.
            container.start_encoding()
        except BaseException:
            self.abandon()
            raise

    def encode(self, array: np.ndarray, pts: int) -> None:
        frame = av.VideoFrame.from_ndarray(array, format="rgb24")
        frame.pts = pts
        self.container.mux(self.stream.encode(frame))

    def finish(self) -> None:
        """Flush the encoder and write the trailer."""
        try:
            self.container.mux(self.stream.encode(None))
        finally:
            self.container.close()

    def abandon(self) -> None:
        """Close without caring whether the trailer could be written."""
        try:
            self.container.close()
        except _AV_ERRORS:
            pass


def _finish(out: _VideoOut | None, doing: str, advice: str = "") -> None:
    """Flush and close an encoder (if open); an error becomes a one-line SinkError."""
    if out is None:
        return
    try:
        out.finish()
    except _AV_ERRORS as e:
        raise SinkError(f"{doing} failed ({_reason(e)}){advice}") from None
