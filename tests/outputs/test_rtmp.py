"""RTMP: pacing to real time, repeats, reconnects, skipping when behind."""

import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from fifo_stream.outputs.base import SinkError
from fifo_stream.outputs.rtmp import RTMPSink
from sink_frames import H, W, frame, free_port


def wait_listening(port: int, timeout: float = 5.0) -> None:
    """Wait until something listens on the port, without connecting to it."""
    needle = f":{port:04X} 00000000:0000 0A"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if needle in Path("/proc/net/tcp").read_text():
                return
        except OSError:
            time.sleep(0.5)  # no /proc: give the listener a moment
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on port {port}")


# No probing ahead, so that frames are timed as they arrive.
RX_OPTIONS = {"listen": "1", "timeout": "20", "analyzeduration": "0", "probesize": "32"}


class Receiver(threading.Thread):
    """A one-connection RTMP server (FFmpeg's listen mode) that decodes what it gets."""

    def __init__(self, port: int, stop_after: int | None = None):
        super().__init__(daemon=True)
        self.url = f"rtmp://127.0.0.1:{port}/live/test"
        self.stop_after = stop_after
        self.frames: list[tuple[float, np.ndarray]] = []
        self.start()
        wait_listening(port)

    def run(self):
        try:
            with av.open(self.url, "r", format="flv", options=RX_OPTIONS) as c:
                for f in c.decode(video=0):
                    self.frames.append((time.monotonic(), f.to_ndarray(format="rgb24")))
                    if self.stop_after and len(self.frames) >= self.stop_after:
                        return
        except (av.FFmpegError, OSError):
            pass  # the sender went away


def test_rtmp_paced_to_real_time():
    rx = Receiver(free_port())
    sink = RTMPSink(rx.url, W, H, 10)
    start = time.monotonic()
    for i in range(20):  # far faster than real time: the bounded queue holds the producer back
        sink.write(frame(i))
    sink.close()
    elapsed = time.monotonic() - start
    rx.join(10)
    assert elapsed >= 1.5
    assert sink.emitted == 20 and sink.skipped == 0
    assert len(rx.frames) == 20
    assert all(f.shape == (H, W, 3) for _, f in rx.frames)
    assert np.abs(rx.frames[10][1].astype(int) - frame(10)).mean() < 8
    span = rx.frames[-1][0] - rx.frames[0][0]
    assert span >= 1.2  # arrived paced, not in a burst


def test_rtmp_repeats_frames_when_generator_is_late():
    rx = Receiver(free_port())
    sink = RTMPSink(rx.url, W, H, 10)
    start = time.monotonic()
    for i in range(5):
        sink.write(frame(i))
        time.sleep(0.4)
    sink.close()
    elapsed = time.monotonic() - start
    rx.join(10)
    assert len(rx.frames) == sink.emitted
    assert abs(len(rx.frames) - 10 * elapsed) <= 4
    assert len(rx.frames) > 10  # frames were repeated to keep the rate


def test_rtmp_unreachable_server():
    start = time.monotonic()
    with pytest.raises(SinkError, match="cannot stream to rtmp://127.0.0.1") as e:
        RTMPSink(f"rtmp://127.0.0.1:{free_port()}/live/secret-key", W, H, 10)
    assert time.monotonic() - start < 5
    assert "secret-key" not in str(e.value) and "\n" not in str(e.value)


def test_rtmp_reconnects_after_drop():
    port = free_port()
    first = Receiver(port, stop_after=5)
    sink = RTMPSink(first.url, W, H, 10, reconnect_delay=0.2)
    second = None
    for i in range(40):
        sink.write(frame(i))
        if second is None and not first.is_alive():
            second = Receiver(port)
    sink.close()
    assert second is not None
    second.join(10)
    assert len(second.frames) > 0


def test_rtmp_gives_up_after_attempts():
    first = Receiver(free_port(), stop_after=3)
    sink = RTMPSink(first.url, W, H, 10, reconnect_attempts=2, reconnect_delay=0.05)
    with pytest.raises(SinkError, match="2 reconnect attempts failed"):
        for i in range(100):
            sink.write(frame(i))
        sink.close()
    sink.close()


class SlowOutput:
    """Stands in for the RTMP connection; each frame takes ``delay`` seconds to send."""

    def __init__(self, delay: float):
        self.delay, self.sent = delay, []

    def encode(self, array, pts):
        time.sleep(self.delay)
        self.sent.append((time.monotonic(), pts))

    def finish(self):
        pass

    def abandon(self):
        pass


def test_rtmp_skips_frames_when_behind(monkeypatch):
    out = SlowOutput(delay=0.1)  # half real time at 20 fps
    monkeypatch.setattr(RTMPSink, "_connect", lambda self: out)
    sink = RTMPSink("rtmp://127.0.0.1/live/x", W, H, 20, max_behind=0.3)
    start = time.monotonic()
    for i in range(40):
        sink.write(frame(i))
    sink.close()
    assert sink.skipped > 0 and sink.emitted + sink.skipped == 40
    for sent, pts in out.sent:  # the stream clock never falls far behind the wall clock
        assert sent - start - pts / 20 < 0.3 + 0.3
