"""Video files: round trips, crash safety, errors."""

import os
import signal
import subprocess

import av
import numpy as np
import pytest

from fifo_stream.errors import FifoStreamError
from fifo_stream.outputs.file import FileSink
from fifo_stream.outputs.base import SinkError
from fifo_stream.outputs.png import PngSink
from sink_frames import H, W, assert_frames, decode, frame, run_child


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".webm"])
def test_file_sink_round_trip(tmp_path, ext):
    path = tmp_path / f"out{ext}"
    with FileSink(path, W, H, 8) as sink:
        for i in range(20):
            sink.write(frame(i))
    frames = decode(str(path))
    assert len(frames) == 20
    assert_frames(frames)


def test_mp4_first_pts_is_zero(tmp_path):
    path = tmp_path / "out.mp4"
    with FileSink(path, W, H, 8) as sink:
        for i in range(10):
            sink.write(frame(i))
    with av.open(str(path)) as c:
        assert min(f.pts for f in c.decode(video=0)) == 0


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_file_survives_sigkill(tmp_path, ext):
    path = tmp_path / f"crash{ext}"
    child = run_child(
        """
        import sys, time
        from fifo_stream.outputs.file import FileSink
        sink = FileSink(sys.argv[1], 96, 64, 10)
        i = 0
        while True:
            sink.write(frame(i))
            i += 1
            if i == 60:
                print("wrote", i, flush=True)
            if i >= 60:
                time.sleep(0.01)
        """,
        str(path), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().split() == ["wrote", "60"]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    frames = decode(str(path))
    # gop 20 (2 s at 10 fps) and x264's lookahead bound what can still be in memory
    assert len(frames) >= 30
    assert_frames(frames)


def test_file_sink_errors(tmp_path):
    with pytest.raises(SinkError, match="extension"):
        FileSink(tmp_path / "out.avi", W, H, 8)
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(SinkError, match="is a directory"):
        FileSink(tmp_path / "dir.mp4", W, H, 8)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SinkError, match="cannot create"):
        FileSink(tmp_path / "file" / "out.mp4", W, H, 8)
    with pytest.raises(SinkError, match="even"):
        FileSink(tmp_path / "odd.mp4", 95, 64, 8)
    with FileSink(tmp_path / "ok.mkv", W, H, 8) as sink, pytest.raises(SinkError, match="shape"):
        sink.write(np.zeros((H + 2, W, 3), np.uint8))
    assert issubclass(SinkError, FifoStreamError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(SinkError, match="cannot write"):
            FileSink(locked / "out.mp4", W, H, 8)
        with pytest.raises(SinkError, match="not writable"):
            PngSink(locked)
    finally:
        locked.chmod(0o700)
