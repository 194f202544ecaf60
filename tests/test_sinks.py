"""Output sinks: files, crash safety, pipes, RTMP pacing, PNG frames, dispatch, segments."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from fifo_stream.errors import FifoStreamError
from fifo_stream.sinks import (
    BackgroundSink,
    FileSink,
    MultiSink,
    PipeSink,
    PngSink,
    RTMPSink,
    SegmentWriter,
    Sink,
    SinkClosed,
    SinkError,
    find_segments,
    join_segments,
    open_sink,
)

ROOT = Path(__file__).resolve().parent.parent
H, W = 64, 96
FRAME_CODE = f"""
import numpy as np
def frame(i, h={H}, w={W}):
    a = np.full((h, w, 3), (i * 9) % 256, np.uint8)
    x = (i * 5) % (w - 8)
    a[:, x:x + 8] = 255 - a[0, 0]
    return a
"""
exec(FRAME_CODE)  # defines frame(i): brightness and a moving bar encode the index


def decode(path_or_file, **kw) -> list[np.ndarray]:
    with av.open(path_or_file, **kw) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def assert_frames(frames: list[np.ndarray], first: int = 0) -> None:
    for i, f in enumerate(frames):
        assert f.shape == (H, W, 3)
        assert np.abs(f.astype(int) - frame(first + i)).mean() < 4, f"frame {i} differs"


def run_child(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", FRAME_CODE + textwrap.dedent(code), *args], cwd=ROOT, env=env, **kw)


# ----------------------------------------------------------------------------- files


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
        from fifo_stream.sinks import FileSink
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


# ----------------------------------------------------------------------------- pipes

PIPE_CHILD = """
import sys
from fifo_stream.sinks import PipeSink, SinkClosed
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


# ----------------------------------------------------------------------------- RTMP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# ----------------------------------------------------------------------------- PNG and dispatch


def test_png_sink(tmp_path):
    with PngSink(tmp_path / "frames", W, H) as sink:
        for i in range(4):
            sink.write(frame(i))
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png"]
    for i, name in enumerate(names):
        (img,) = decode(str(tmp_path / "frames" / name))
        assert (img == frame(i)).all()  # lossless


def test_open_sink_dispatch(tmp_path):
    assert isinstance(open_sink(str(tmp_path / "a.mkv"), W, H, 8), FileSink)
    assert isinstance(open_sink(str(tmp_path) + "/", W, H, 8), PngSink)
    assert isinstance(open_sink(str(tmp_path / "new") + "/", W, H, 8), PngSink)
    pipe = open_sink("-", W, H, 8, fmt="rawvideo")
    assert isinstance(pipe, PipeSink) and pipe.stream is sys.stdout.buffer
    with pytest.raises(SinkError, match="scheme ftp://"):
        open_sink("ftp://x/y.mp4", W, H, 8)
    with pytest.raises(SinkError, match="extension"):
        open_sink(str(tmp_path / "a.gif"), W, H, 8)
    with pytest.raises(SinkError, match="cannot stream"):
        open_sink(f"rtmp://127.0.0.1:{free_port()}/live/x", W, H, 8)
    (tmp_path / "f").write_text("x")
    with pytest.raises(SinkError, match="is a file"):
        open_sink(str(tmp_path / "f") + "/", W, H, 8)
    with pytest.raises(SinkError, match="not valid"):
        open_sink(str(tmp_path / "b.mp4"), W, H, 8, bogus=1)


# ----------------------------------------------------------------------------- helpers


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


# ----------------------------------------------------------------------------- segments


def packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(video=0) if p.size]


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_segments_join_by_stream_copy(tmp_path, ext):
    writer = SegmentWriter(tmp_path / "segs", "run", ext, W, H, 8)
    lengths, n, segments = [5, 13, 8], 0, []
    for length in lengths:
        for _ in range(length):
            writer.write(frame(n))
            n += 1
        segments.append(writer.cut())
    assert writer.cut() is None
    assert segments == [tmp_path / "segs" / f"run.0000{i}{ext}" for i in range(3)]
    assert not list((tmp_path / "segs").glob("*.partial"))
    for segment, length in zip(segments, lengths):
        with av.open(str(segment)) as c:
            pts = [f.pts for f in c.decode(video=0)]
        assert len(pts) == length and min(pts) == 0

    out = join_segments(segments, tmp_path / f"joined{ext}")
    frames = decode(str(out))
    assert len(frames) == sum(lengths)
    assert_frames(frames)
    assert packets(out) == [p for s in segments for p in packets(s)]  # no re-encode
    with av.open(str(out)) as c:
        pts = [f.pts for f in c.decode(video=0)]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)
    assert not list(tmp_path.glob(".*joining"))


def test_segment_writer_resumes_numbering(tmp_path):
    writer = SegmentWriter(tmp_path, "run", "mkv", W, H, 8)
    writer.write(frame(0))
    first = writer.cut()
    writer.write(frame(1))  # left as .partial, as after a crash
    resumed = SegmentWriter(tmp_path, "run", "mkv", W, H, 8)
    assert resumed.index == 1
    resumed.write(frame(1))
    resumed.close()
    assert find_segments(tmp_path, "run", ".mkv") == [first, tmp_path / "run.00001.mkv"]
    writer._sink.close()


def test_join_errors(tmp_path):
    with pytest.raises(SinkError, match="no segments"):
        join_segments([], tmp_path / "out.mp4")
    with pytest.raises(SinkError, match="extension"):
        join_segments([tmp_path / "x.mkv"], tmp_path / "out.avi")
    writer = SegmentWriter(tmp_path, "run", ".mkv", W, H, 8)
    writer.write(frame(0))
    segment = writer.cut()
    with pytest.raises(SinkError, match="cannot hold h264"):
        join_segments([segment], tmp_path / "out.webm")
