"""Pipes: streamable containers, raw video, a reader that goes away."""

import os
import subprocess

import numpy as np
import pytest

from fifo_stream.outputs.base import SinkClosed, SinkError
from fifo_stream.outputs.pipe import PipeSink
from sink_frames import H, W, assert_frames, decode, frame, run_child

PIPE_CHILD = """
import sys
from fifo_stream.outputs.base import SinkClosed
from fifo_stream.outputs.pipe import PipeSink
fmt, n = sys.argv[1], int(sys.argv[2])
try:
    sink = PipeSink(96, 64, 8, fmt=fmt)
    for i in range(n):
        sink.write(frame(i))
    sink.close()
except SinkClosed as e:
    print(f"fifo-stream: {e}", file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.parametrize("fmt", ["matroska", "nut", "mpegts"])
def test_pipe_container(fmt):
    child = run_child(PIPE_CHILD, fmt, "15", stdout=subprocess.PIPE)
    frames = decode(child.stdout, format=fmt)
    assert child.wait() == 0
    assert len(frames) == 15
    assert_frames(frames)


def test_pipe_rawvideo():
    child = run_child(PIPE_CHILD, "rawvideo", "7", stdout=subprocess.PIPE)
    data, _ = child.communicate()
    assert child.returncode == 0
    assert len(data) == 7 * H * W * 3
    raw = np.frombuffer(data, np.uint8).reshape(7, H, W, 3)
    assert all((raw[i] == frame(i)).all() for i in range(7))


@pytest.mark.parametrize("fmt", ["matroska", "rawvideo"])
def test_pipe_reader_goes_away(fmt):
    child = run_child(PIPE_CHILD, fmt, "1000000", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False)
    child.stdout.read(4096)
    child.stdout.close()
    _, err = child.communicate(timeout=30)
    lines = err.decode().strip().splitlines()
    assert child.returncode == 3
    assert len(lines) == 1 and lines[0].startswith("fifo-stream: ") and "Traceback" not in lines[0]


@pytest.mark.parametrize("fmt", ["matroska", "rawvideo"])
def test_pipe_closed_reader_in_process(fmt):
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "wb") as stream:
        with pytest.raises(SinkClosed):  # matroska fails on its header, rawvideo on the frame
            sink = PipeSink(W, H, 8, stream=stream, fmt=fmt)
            sink.write(frame(0))
    assert issubclass(SinkClosed, SinkError)


def test_pipe_sink_to_file_object(tmp_path):
    path = tmp_path / "pipe.mkv"
    with open(path, "wb") as f, PipeSink(W, H, 8, stream=f, fmt="matroska") as sink:
        for i in range(5):
            sink.write(frame(i))
    assert len(decode(str(path))) == 5
    with pytest.raises(SinkError, match="pipe format"):
        PipeSink(W, H, 8, stream=open(os.devnull, "wb"), fmt="mp4")
