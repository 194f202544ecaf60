"""Sinks over sinks: background threads and writing to several sinks."""

import threading
import time

import pytest

from fifo_stream.outputs.base import Sink, SinkError
from fifo_stream.outputs.file import FileSink
from fifo_stream.outputs.png import PngSink
from fifo_stream.outputs.workers import BackgroundSink, MultiSink
from sink_frames import H, W, decode, frame


class Failing(Sink):
    def __init__(self, fail_at: int):
        self.fail_at, self.seen, self.closed = fail_at, 0, False

    def write(self, frame):
        if self.seen == self.fail_at:
            raise RuntimeError("encoder exploded")
        self.seen += 1

    def close(self):
        self.closed = True


def test_background_sink_propagates_errors():
    inner = Failing(fail_at=3)
    sink = BackgroundSink(inner, maxsize=2)
    with pytest.raises(RuntimeError, match="exploded"):
        for i in range(50):
            sink.write(frame(i))
            time.sleep(0.005)
    sink.close()
    assert inner.closed and inner.seen == 3

    inner = Failing(fail_at=100)
    sink = BackgroundSink(inner)
    for i in range(5):
        sink.write(frame(i))
    sink.close()
    assert inner.seen == 5 and inner.closed

    sink = BackgroundSink(Failing(fail_at=0))
    sink.write(frame(0))
    with pytest.raises(RuntimeError, match="exploded"):
        sink.close()


def test_multi_sink(tmp_path):
    sinks = [BackgroundSink(FileSink(tmp_path / "a.mkv", W, H, 8)), PngSink(tmp_path / "png")]
    with MultiSink(sinks) as sink:
        for i in range(6):
            sink.write(frame(i))
    assert len(decode(str(tmp_path / "a.mkv"))) == 6
    assert len(list((tmp_path / "png").glob("*.png"))) == 6


def test_flush_then_runs_on_the_thread_after_the_frames():
    inner = Failing(fail_at=100)
    sink = BackgroundSink(inner)
    seen = []
    for i in range(3):
        sink.write(frame(i))
    sink.flush(then=lambda: seen.append((inner.seen, threading.current_thread() is sink._thread)))
    assert seen == [(3, True)]

    def cut():
        raise RuntimeError("cut exploded")

    with pytest.raises(RuntimeError, match="cut exploded"):
        sink.flush(then=cut)
    assert sink.failed
    with pytest.raises(SinkError, match="has failed"):
        sink.write(frame(3))
    sink.close()  # the error was reported once
    assert inner.closed


def test_multi_sink_writes_every_sink_before_raising(tmp_path):
    png = PngSink(tmp_path / "png")
    sink = MultiSink([Failing(fail_at=1), png])
    sink.write(frame(0))
    with pytest.raises(RuntimeError, match="exploded"):
        sink.write(frame(1))
    assert png.index == 2  # the PNG frames keep their numbers
