"""A live stream to an RTMP(S) server, paced to real time on a background thread."""

from __future__ import annotations

import math
import queue
import time
from urllib.parse import urlsplit

import av
import numpy as np

from .base import _AV_ERRORS, SinkError, _check_frame, _check_size, _codec_options, _finish, _rate, _reason, _VideoOut, default_gop
from .workers import _END, _Worker


def _redact(url: str) -> str:
    """scheme://host[:port] of a URL, leaving out credentials and the stream key."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


class RTMPSink(_Worker):
    """A live FLV/H.264 stream to an RTMP(S) server, paced to real time.

    A background thread emits exactly one frame per 1/fps of wall clock: it repeats the
    last frame when the generator is late, the producer blocks on a queue of about one
    second of frames when it is ahead, and queued frames are skipped once the stream falls
    more than ``max_behind`` seconds behind. A dropped connection is retried
    ``reconnect_attempts`` times with exponential backoff before ``SinkError``; the frame
    that failed and those queued meanwhile go to the new connection, none skipped.
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
            return _VideoOut(container, self.width, self.height, self.fps, codec, pix_fmt, options, default_gop(self.fps))
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
        start, tick, base = time.monotonic(), 0, 0  # base: first tick of the current connection, sent at start
        while True:
            out = self._out
            base = self._emit(last, tick, base)
            if self._out is not out:  # reconnected: the new stream's clock starts now, so the outage skips nothing
                start = time.monotonic()
            tick += 1
            due = start + (tick - base) * period
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
