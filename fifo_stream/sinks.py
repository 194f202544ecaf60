"""Where generated frames go: files, pipes, RTMP servers, PNG frames, and resumable segments.

Every sink takes frames one at a time as uint8 numpy arrays of shape (H, W, 3), RGB, and
encodes them with PyAV. Files are written so that a process killed mid-write leaves a
playable file (fragmented MP4, Matroska). ``BackgroundSink`` moves encoding off the
generator's thread; ``SegmentWriter`` and ``join_segments`` give exact resume.
"""

from __future__ import annotations

import errno
import inspect
import math
import os
import queue
import re
import sys
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence
from urllib.parse import urlsplit

import av
import numpy as np

from .durable import fsync
from .errors import FifoStreamError

# delay_moov postpones the moov box until the first fragment, so it can carry the edit list
# that makes the first pts 0 when the encoder uses B-frames.
MP4_MOVFLAGS = "frag_keyframe+empty_moov+delay_moov+default_base_moof"


class SinkError(FifoStreamError):
    """An output cannot be opened or written."""


class SinkClosed(SinkError):
    """The consumer of a pipe went away; nothing more can be written."""

    exit_code = 3


@dataclass(frozen=True)
class _FileFormat:
    name: str  # FFmpeg muxer
    codec: str  # default encoder


_FILE_FORMATS = {
    ".mp4": _FileFormat("mp4", "libx264"),
    ".mkv": _FileFormat("matroska", "libx264"),
    ".webm": _FileFormat("webm", "libvpx-vp9"),
}
_PIPE_FORMATS = ("matroska", "nut", "mpegts", "rawvideo")
_AV_ERRORS = (av.FFmpegError, OSError, ValueError)
_END = object()  # queue sentinel: no more frames


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


# ----------------------------------------------------------------------------- helpers


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message."""
    text = str(exc).strip() or type(exc).__name__
    return re.sub(r"^\[Errno -?\d+\] ", "", text.splitlines()[0])


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


def _rate(fps: float) -> Fraction:
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise SinkError(f"fps must be positive, got {fps}; pass a frame rate such as 8")
    return rate


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


def _redact(url: str) -> str:
    """scheme://host[:port] of a URL, leaving out credentials and the stream key."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


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


# ----------------------------------------------------------------------------- files


def _finish(out: _VideoOut | None, doing: str, advice: str = "") -> None:
    """Flush and close an encoder (if open); an error becomes a one-line SinkError."""
    if out is None:
        return
    try:
        out.finish()
    except _AV_ERRORS as e:
        raise SinkError(f"{doing} failed ({_reason(e)}){advice}") from None


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
        suffix = (ext or self.path.suffix).lower()
        suffix = suffix if suffix.startswith(".") or not suffix else "." + suffix
        if suffix not in _FILE_FORMATS:
            raise SinkError(
                f"unsupported output extension {suffix or '(none)'!r} in {self.path}; "
                "use .mp4, .mkv or .webm, a directory/ for PNG frames, '-' for stdout, or an rtmp:// URL"
            )
        if self.path.is_dir():
            raise SinkError(f"output path {self.path} is a directory; give a file name such as {self.path / ('out' + suffix)}")
        _check_size(width, height, pix_fmt)
        _rate(fps)  # rejects fps <= 0 before anything is opened
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SinkError(f"cannot create output directory {self.path.parent} ({e.strerror}); choose a writable location") from None
        fmt = _FILE_FORMATS[suffix]
        codec = codec or fmt.codec
        gop = gop or max(1, round(2 * fps))
        container_options = {"flush_packets": "1"}
        if fmt.name == "mp4":
            container_options["movflags"] = MP4_MOVFLAGS
        else:
            # Matroska holds a cluster in memory until it closes; by default that is only
            # every 5 s, or at a keyframe once the cluster exceeds 4 KiB.
            container_options["cluster_time_limit"] = str(max(1, round(1000 * gop / fps)))
        try:
            container = av.open(str(self.path), "w", format=fmt.name, container_options=container_options)
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


# ----------------------------------------------------------------------------- pipes


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
        if fmt not in _PIPE_FORMATS:
            raise SinkError(f"unsupported pipe format {fmt!r}; use one of {', '.join(_PIPE_FORMATS)}")
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
                _codec_options(codec, crf, preset, None, codec_options), gop or max(1, round(2 * fps)),
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


# ----------------------------------------------------------------------------- RTMP


class _Worker(Sink):
    """A sink whose frames are consumed by a background thread through a bounded queue.

    An exception in the thread is re-raised once, on the next ``write`` or on ``close``;
    after it the thread keeps draining the queue so that the producer never blocks.
    """

    def __init__(self, maxsize: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._error: BaseException | None = None
        self._reported = False
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=f"sink-{type(self).__name__}", daemon=True)
        self._thread.start()

    @abstractmethod
    def _work(self) -> None:
        """Consume ``self._queue`` until ``_END``."""

    def _main(self) -> None:
        try:
            self._work()
        except BaseException as e:
            self._error = e
            while (item := self._queue.get()) is not _END:
                if isinstance(item, threading.Event):
                    item.set()

    def _raise_error(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def _put(self, item: object) -> None:
        self._raise_error()
        if self._error is not None or self._closed:
            raise SinkError(f"cannot write to the {type(self).__name__}: it has failed or is closed")
        self._queue.put(item)

    def _stop(self) -> bool:
        """Send ``_END`` and wait for the thread; False if already stopped."""
        if self._closed:
            return False
        self._closed = True
        self._queue.put(_END)
        self._thread.join()
        return True


class RTMPSink(_Worker):
    """A live FLV/H.264 stream to an RTMP(S) server, paced to real time.

    A background thread emits exactly one frame per 1/fps of wall clock: it repeats the
    last frame when the generator is late, the producer blocks on a queue of about one
    second of frames when it is ahead, and queued frames are skipped once the stream falls
    more than ``max_behind`` seconds behind. A dropped connection is retried
    ``reconnect_attempts`` times with exponential backoff before ``SinkError``.
    """

    def __init__(
        self,
        url: str,
        width: int,
        height: int,
        fps: float,
        codec: str = "libx264",
        crf: int = 23,
        preset: str = "veryfast",
        pix_fmt: str = "yuv420p",
        *,
        reconnect_attempts: int = 3,
        reconnect_delay: float = 1.0,
        max_behind: float = 1.0,
        codec_options: dict | None = None,
    ) -> None:
        _check_size(width, height, pix_fmt)
        self.url, self.width, self.height = url, width, height
        self.fps = float(_rate(fps))
        self.reconnect_attempts, self.reconnect_delay, self.max_behind = reconnect_attempts, reconnect_delay, max_behind
        self._encoder = (codec, pix_fmt, _codec_options(codec, crf, preset, "zerolatency", codec_options))
        self._out: _VideoOut | None = self._connect()
        self.emitted = 0  # frames sent, repeats included
        self.skipped = 0  # queued frames dropped to catch up
        super().__init__(maxsize=max(2, math.ceil(self.fps)))

    def _connect(self) -> _VideoOut:
        codec, pix_fmt, options = self._encoder
        try:
            container = av.open(self.url, "w", format="flv")
            return _VideoOut(container, self.width, self.height, self.fps, codec, pix_fmt, options, max(1, round(2 * self.fps)))
        except SinkError:
            raise
        except _AV_ERRORS as e:
            raise SinkError(
                f"cannot stream to {_redact(self.url)} ({_reason(e)}); "
                "check that the RTMP server is running and the URL is right"
            ) from None

    def _work(self) -> None:
        last = self._queue.get()
        if last is _END:
            self._finish()
            return
        period = 1.0 / self.fps
        start, tick, base = time.monotonic(), 0, 0  # base: first tick of the current connection
        while True:
            base = self._emit(last, tick, base)
            tick += 1
            due = start + tick * period
            late = time.monotonic() - due
            if late > self.max_behind:
                skip = int(late / period)
                tick += skip
                due += skip * period
                for _ in range(skip):
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _END:
                        self._finish()
                        return
                    last = item
                    self.skipped += 1
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                continue  # the generator is late: repeat the last frame
            if item is _END:
                self._finish()
                return
            last = item

    def _emit(self, array: np.ndarray, tick: int, base: int) -> int:
        """Send one frame, reconnecting if the connection dropped; returns the connection's first tick."""
        failures = 0
        while True:
            try:
                if self._out is None:
                    self._out, base = self._connect(), tick
                self._out.encode(array, tick - base)
                self.emitted += 1
                return base
            except (SinkError, *_AV_ERRORS) as e:
                if self._out is not None:
                    self._out.abandon()
                    self._out = None
                if failures >= self.reconnect_attempts:
                    raise SinkError(
                        f"lost the stream to {_redact(self.url)} and {failures} reconnect attempts failed "
                        f"({_reason(e)}); check the RTMP server"
                    ) from None
                time.sleep(self.reconnect_delay * 2**failures)
                failures += 1

    def _finish(self) -> None:
        out, self._out = self._out, None
        _finish(out, f"closing the stream to {_redact(self.url)}")

    def write(self, frame: np.ndarray) -> None:
        self._put(_check_frame(frame, self.width, self.height))

    def close(self) -> None:
        if not self._stop():
            return
        if self._out is not None:  # the thread failed
            self._out.abandon()
            self._out = None
        self._raise_error()


# ----------------------------------------------------------------------------- PNG frames


class PngSink(Sink):
    """Each frame as a PNG file ``000000.png``, ``000001.png``, ... in ``directory``.

    Files appear atomically (written under a temporary name, then renamed). ``start``
    is the first file number; ``width``/``height``, when given, are checked on each frame.
    """

    def __init__(self, directory: str | os.PathLike, width: int | None = None, height: int | None = None, start: int = 0) -> None:
        self.directory = Path(directory)
        self.width, self.height = width, height
        self.index = start
        if self.directory.exists() and not self.directory.is_dir():
            raise SinkError(f"{self.directory} is a file, not a directory; give a directory path for PNG frames")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SinkError(f"cannot create frame directory {self.directory} ({e.strerror}); choose a writable location") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise SinkError(f"frame directory {self.directory} is not writable; choose a writable location")
        self._codec: av.CodecContext | None = None

    def write(self, frame: np.ndarray) -> None:
        array = np.asarray(frame)
        height, width = (self.height, self.width) if self.width else array.shape[:2]
        array = _check_frame(array, width, height)
        if self._codec is None:
            self._codec = av.CodecContext.create("png", "w")
            self._codec.width, self._codec.height, self._codec.pix_fmt = width, height, "rgb24"
            self.width, self.height = width, height
        data = b"".join(bytes(p) for p in self._codec.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        path = self.directory / f"{self.index:06d}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            raise SinkError(f"writing {path} failed ({e.strerror}); check free disk space") from None
        self.index += 1

    def close(self) -> None:
        self._codec = None


# ----------------------------------------------------------------------------- helpers over sinks


class BackgroundSink(_Worker):
    """Runs another sink's ``write`` on a background thread fed by a bounded queue.

    The producer only waits when ``maxsize`` frames are pending. An exception raised by the
    inner sink is re-raised on the producer's next ``write`` or on ``close``; ``close``
    drains the queue and closes the inner sink. Frames must not be modified after ``write``.
    """

    def __init__(self, sink: Sink, maxsize: int = 16) -> None:
        self.sink = sink
        super().__init__(maxsize)

    def _work(self) -> None:
        while (item := self._queue.get()) is not _END:
            if isinstance(item, threading.Event):
                item.set()
            else:
                self.sink.write(item)

    def write(self, frame: np.ndarray) -> None:
        self._put(frame)

    def flush(self) -> None:
        """Wait until every frame written so far has reached the inner sink (re-raising its error)."""
        done = threading.Event()
        self._put(done)
        done.wait()
        self._raise_error()

    def close(self) -> None:
        if not self._stop():
            return
        try:
            self.sink.close()
        except BaseException:
            if self._error is None:
                raise
        self._raise_error()


class MultiSink(Sink):
    """Writes every frame to several sinks; wrap slow ones in ``BackgroundSink`` so they run in parallel."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)

    def write(self, frame: np.ndarray) -> None:
        for sink in self.sinks:
            sink.write(frame)

    def close(self) -> None:
        """Close every sink, then raise the first error any of them raised."""
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first


# ----------------------------------------------------------------------------- dispatch


def target_kind(target: str) -> str:
    """What an output target names: "pipe" ("-"), "rtmp" (URL), "png" (directory) or "file"."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", target)
    if target == "-":
        return "pipe"
    if scheme:
        if scheme.group(1).lower() not in ("rtmp", "rtmps"):
            raise SinkError(f"unsupported output URL scheme {scheme.group(1)}://; use rtmp:// or rtmps://, a file path, a directory/ or '-'")
        return "rtmp"
    path = Path(target)
    if target.endswith(("/", os.sep)) or (path.is_dir() and path.suffix.lower() not in _FILE_FORMATS):
        return "png"
    return "file"


def validate_target(target: str) -> str:
    """Check an output target without opening it (nothing is created); returns its kind."""
    kind = target_kind(target)
    if kind not in ("file", "png"):
        return kind
    path = Path(target)
    if kind == "file":
        if path.suffix.lower() not in _FILE_FORMATS:
            raise SinkError(
                f"unsupported output extension {path.suffix or '(none)'!r} in {target}; "
                "use .mp4, .mkv or .webm, a directory/ for PNG frames, '-' for stdout, or an rtmp:// URL"
            )
        if path.is_dir():
            raise SinkError(f"output path {path} is a directory; give a file name such as {path / ('out' + path.suffix)}")
    existing = (path if kind == "png" else path.parent).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SinkError(f"cannot write output {target}: {existing} is not a writable directory; choose a writable location")
    return kind


def open_sink(target: str, width: int, height: int, fps: float, **options) -> Sink:
    """Open the sink a target names: "-" (stdout), rtmp(s):// URL, directory/ (PNG frames), or a video file.

    ``options`` go to the sink's constructor; one that the sink does not take is a ``SinkError``.
    """
    kind = target_kind(target)
    cls, args = {
        "pipe": (PipeSink, (width, height, fps)),
        "rtmp": (RTMPSink, (target, width, height, fps)),
        "png": (PngSink, (target, width, height)),
        "file": (FileSink, (target, width, height, fps)),
    }[kind]
    try:
        inspect.signature(cls).bind(*args, **options)
    except TypeError as e:
        raise SinkError(f"option not valid for {cls.__name__} output {target!r} ({e})") from None
    return cls(*args, **options)


# ----------------------------------------------------------------------------- segments


def find_segments(directory: str | os.PathLike, stem: str, ext: str) -> list[Path]:
    """Finished segments ``stem.NNNNN.ext`` in ``directory``, in index order."""
    ext = ext if ext.startswith(".") else "." + ext
    pattern = re.compile(re.escape(stem) + r"\.(\d{5,})" + re.escape(ext) + "$")
    found = [(int(m.group(1)), p) for p in Path(directory).glob(f"{stem}.*{ext}") if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


class SegmentWriter(Sink):
    """Writes frames into segment files ``stem.NNNNN.ext`` that are finished by ``cut()``.

    The open segment is ``stem.NNNNN.ext.partial`` (itself crash-tolerant). Numbering starts
    at ``index``, by default one past the highest finished segment already in ``directory``.
    Other keyword arguments go to ``FileSink``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        stem: str,
        ext: str,
        width: int,
        height: int,
        fps: float,
        *,
        index: int | None = None,
        **file_options,
    ) -> None:
        self.directory = Path(directory)
        self.stem = stem
        self.ext = ext if ext.startswith(".") else "." + ext
        if self.ext.lower() not in _FILE_FORMATS:
            raise SinkError(f"unsupported segment extension {self.ext!r}; use .mp4, .mkv or .webm")
        self.width, self.height, self.fps = width, height, fps
        self.file_options = file_options
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SinkError(f"cannot create segment directory {self.directory} ({e.strerror}); choose a writable location") from None
        if index is None:
            existing = find_segments(self.directory, stem, self.ext)
            index = int(existing[-1].name[len(stem) + 1:-len(self.ext)]) + 1 if existing else 0
        self.index = index
        self._sink: FileSink | None = None

    def segment_path(self, index: int) -> Path:
        """The finished path of segment ``index``."""
        return self.directory / f"{self.stem}.{index:05d}{self.ext}"

    @property
    def frames_in_segment(self) -> int:
        """Frames written to the open segment."""
        return self._sink.frames if self._sink else 0

    def write(self, frame: np.ndarray) -> None:
        if self._sink is None:
            partial = self.segment_path(self.index).with_name(self.segment_path(self.index).name + ".partial")
            self._sink = FileSink(partial, self.width, self.height, self.fps, ext=self.ext, **self.file_options)
        self._sink.write(frame)

    def cut(self) -> Path | None:
        """Finish the open segment: close, fsync, rename to its final name, fsync the directory.

        Returns the finished path, or None when no frame was written since the last cut.
        """
        sink, self._sink = self._sink, None
        if sink is None:
            return None
        sink.close()
        final = self.segment_path(self.index)
        try:
            fsync(sink.path)
            os.replace(sink.path, final)
            fsync(self.directory, directory=True)
        except OSError as e:
            raise SinkError(f"finishing segment {final} failed ({e.strerror}); check free disk space") from None
        self.index += 1
        return final

    def close(self) -> None:
        """Finish the open segment, if any."""
        self.cut()


def _decode_order_pts(path: str | os.PathLike) -> list[int]:
    with av.open(str(path)) as src:
        if not src.streams.video:
            raise SinkError(f"segment {path} has no video stream; remove it from the list")
        return [p.pts for p in src.demux(src.streams.video[0]) if p.pts is not None]


def _reorder_depth(pts: list[int]) -> int:
    """How many frames decode order runs ahead of presentation order at most."""
    rank = {value: r for r, value in enumerate(sorted(pts))}
    return max([k - rank[value] for k, value in enumerate(pts)], default=0)


def join_segments(segments: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Concatenate video segments into ``out`` by stream copy (no re-encode), with continuous timestamps.

    Segments must share codec and frame size. The result is written under a temporary
    name and renamed into place; its container follows ``out``'s extension.
    """
    out = Path(out)
    if not segments:
        raise SinkError(f"no segments to join into {out}; write some frames first")
    fmt = _FILE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise SinkError(f"unsupported output extension {out.suffix or '(none)'!r} in {out}; use .mp4, .mkv or .webm")
    tmp = out.with_name(f".{out.name}.joining")
    options = {"movflags": "+faststart"} if fmt.name == "mp4" else {}
    try:
        # Matroska stores no dts, so decode timestamps are rebuilt from presentation order:
        # dts_k = (k - delay)-th smallest pts, with one delay for all segments so that dts
        # keep increasing across the joins.
        orders = [_decode_order_pts(segment) for segment in segments]
        delay = max(_reorder_depth(pts) for pts in orders)
        with av.open(str(tmp), "w", format=fmt.name, container_options=options) as dst:
            ostream = None
            offset = Fraction(0)  # start of the current segment, in seconds
            for segment, pts in zip(segments, orders):
                with av.open(str(segment)) as src:
                    istream = src.streams.video[0]
                    kind = (istream.codec_context.name, istream.width, istream.height)
                    if ostream is None:
                        try:
                            ostream = dst.add_stream_from_template(istream)
                        except ValueError:
                            raise SinkError(f"{out.suffix} cannot hold {kind[0]} video; join into {Path(segment).suffix} instead") from None
                        first = kind
                    elif kind != first:
                        raise SinkError(f"segment {segment} differs in codec or frame size from the first; join only segments of one run")
                    tb = istream.time_base
                    step = 1 / (istream.average_rate or istream.guessed_rate or istream.base_rate)
                    shift = round(offset / tb)
                    ordered = sorted(pts)
                    packets = (p for p in src.demux(istream) if p.pts is not None)
                    for k, packet in enumerate(packets):
                        dts = ordered[k - delay] if k >= delay else ordered[0] - round((delay - k) * step / tb)
                        packet.pts += shift
                        packet.dts = dts + shift
                        packet.stream = ostream
                        dst.mux(packet)
                    offset += (ordered[-1] * tb + step) if ordered else 0
        fsync(tmp)
        os.replace(tmp, out)
        fsync(out.parent, directory=True)
    except SinkError:
        tmp.unlink(missing_ok=True)
        raise
    except _AV_ERRORS as e:
        tmp.unlink(missing_ok=True)
        raise SinkError(f"joining segments into {out} failed ({_reason(e)}); check that every segment is a finished video file") from None
    return out
