"""RTMP against a real server (nginx-rtmp): what it records is every frame, also across a server restart."""

import json
import os
import subprocess
import sys
import threading
import time

import av
import numpy as np

from fifo_stream.outputs.targets import open_sink
from nginx_rtmp import count_frames, needs_ffprobe, nginx_rtmp  # noqa: F401 (the fixture)

SIZE, FPS = 64, 8
# The tests' random-weight model (tests/conftest.py): as fast as the embedded one, and its noise-like
# frames differ from each other by ~40 levels, far more than libx264 changes them (under 15).
# One partition (S = f): frames come from the first tick on.
RUN = ["--quiet", "sampling.partitions=1"]
PROMPT = "a red circle"
RUN_TOLERANCE = 20


def square(i: int) -> np.ndarray:
    """Frame i (i < 43): a background color and a white square's position that change with i; any two
    frames differ by at least 17 levels on average, libx264 changes them by under 3."""
    a = np.empty((SIZE, SIZE, 3), np.uint8)
    a[:] = (6 * i, 128, (37 * i) % 256)
    x, y = (3 * i) % (SIZE - 16), (5 * i) % (SIZE - 16)
    a[y:y + 16, x:x + 16] = 255
    return a


def decode(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def matches(recorded: list[np.ndarray], sent: list[np.ndarray], tolerance: float = 8.0) -> list[int]:
    """The index of the sent frame each recorded frame is (libx264 is lossy: the nearest one, within ``tolerance``)."""
    found = []
    for k, r in enumerate(recorded):
        diffs = [np.abs(r.astype(int) - s).mean() for s in sent]
        best = int(np.argmin(diffs))
        assert diffs[best] < tolerance, f"recorded frame {k} is none of the sent frames (nearest {best}, {diffs[best]:.1f} levels off)"
        found.append(best)
    return found


def assert_every_frame_in_order(recordings: list[list[np.ndarray]], sent: list[np.ndarray], tolerance: float = 8.0) -> None:
    """Each recording is sent frames in order (repeats allowed), and together they hold every sent frame."""
    seen = set()
    for k, recorded in enumerate(recordings):
        found = matches(recorded, sent, tolerance)
        assert found == sorted(found), f"recording {k} is out of order: {found}"
        seen.update(found)
    assert seen == set(range(len(sent))), f"frames missing from the recordings: {sorted(set(range(len(sent))) - seen)}"


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fifo_stream", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def png_frames(directory) -> list[np.ndarray]:
    return [decode(p)[0] for p in sorted(directory.glob("*.png"))]


def restart_later(server, when, gap: float = 1.5) -> threading.Thread:
    """Stop ``server`` at once (dropping its streams) when ``when()`` is true, then start it again after ``gap`` seconds."""
    def run():
        while not when():
            time.sleep(0.05)
        server.stop(graceful=False)
        time.sleep(gap)  # longer than the sink's first reconnect delay: its first attempt is refused
        server.start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@needs_ffprobe
def test_sink_recording_holds_every_frame(nginx_rtmp):
    n = 24
    sink = open_sink(nginx_rtmp.url("test"), SIZE, SIZE, FPS)
    for i in range(n):  # faster than real time: the sink's queue paces the writes, nothing repeats
        sink.write(square(i))
    sink.close()
    assert sink.emitted == n and sink.skipped == 0
    nginx_rtmp.stop()
    [recording] = nginx_rtmp.recordings("test")
    assert count_frames(recording) == n
    assert matches(decode(recording), [square(i) for i in range(n)]) == list(range(n))


def test_sink_survives_server_restart(nginx_rtmp):
    n = 40
    sink = open_sink(nginx_rtmp.url("test"), SIZE, SIZE, FPS, reconnect_delay=1.0)
    restart = restart_later(nginx_rtmp, lambda: sink.emitted >= 12)
    for i in range(n):
        sink.write(square(i))
    sink.close()
    restart.join(30)
    nginx_rtmp.stop()
    recordings = nginx_rtmp.recordings("test")
    assert len(recordings) == 2
    assert_every_frame_in_order([decode(p) for p in recordings], [square(i) for i in range(n)])


@needs_ffprobe
def test_run_recording_holds_every_frame(nginx_rtmp, tmp_path):
    frames = 8
    # 2 fps, slower than the model makes frames; a frame that comes late all the same (a loaded machine)
    # is bridged by repeating the last one, as a live stream must: the run's frames in order, repeats allowed.
    proc = cli("generate", PROMPT, "--frames", str(frames), "--out", nginx_rtmp.url("x"), "--out", f"{tmp_path}/png/",
               "--run-dir", str(tmp_path / "run"), *RUN, "video.fps=2")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    nginx_rtmp.stop()
    [recording] = nginx_rtmp.recordings("x")
    assert count_frames(recording) >= frames
    assert_every_frame_in_order([decode(recording)], png_frames(tmp_path / "png"), RUN_TOLERANCE)


def test_run_survives_server_restart(nginx_rtmp, tmp_path):
    frames = 24
    proc = cli("generate", PROMPT, "--frames", str(frames), "--out", nginx_rtmp.url("x"), "--out", f"{tmp_path}/png/",
               "--run-dir", str(tmp_path / "run"), *RUN, f"video.fps={FPS}")
    restart = restart_later(nginx_rtmp, lambda: len(list((tmp_path / "png").glob("*.png"))) >= 6)
    _, err = proc.communicate(timeout=120)
    restart.join(30)
    assert proc.returncode == 0, err
    nginx_rtmp.stop()
    recordings = nginx_rtmp.recordings("x")
    assert len(recordings) == 2
    assert_every_frame_in_order([decode(p) for p in recordings], png_frames(tmp_path / "png"), RUN_TOLERANCE)


def test_run_exits_3_when_the_server_stays_down_and_resume_streams_the_rest(nginx_rtmp, tmp_path):
    frames, run_dir, png = 24, tmp_path / "run", tmp_path / "png"
    # RTMP first: its failure must not cost the PNG output, the reference, any frame.
    proc = cli("generate", PROMPT, "--frames", str(frames), "--out", nginx_rtmp.url("x"), "--out", f"{png}/",
               "--run-dir", str(run_dir), *RUN, f"video.fps={FPS}")
    while len(list(png.glob("*.png"))) < 6 and proc.poll() is None:
        time.sleep(0.05)
    nginx_rtmp.stop(graceful=False)  # and not back before the sink's reconnect attempts (about 7 s) are spent
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1, err
    assert "lost the stream to rtmp://127.0.0.1" in lines[0] and f"fifo-stream resume {run_dir}" in lines[0], err
    saved = json.loads((run_dir / "manifest.json").read_text())["frames_written"]
    assert 6 <= saved < frames

    nginx_rtmp.start()
    resume = cli("resume", str(run_dir), "--quiet")
    _, err = resume.communicate(timeout=120)
    assert resume.returncode == 0, err
    nginx_rtmp.stop()
    sent, recordings = png_frames(png), nginx_rtmp.recordings("x")
    assert len(sent) == frames and len(recordings) == 2
    before, after = (matches(decode(p), sent, RUN_TOLERANCE) for p in recordings)
    assert before == sorted(before) and set(before) == set(range(before[-1] + 1))
    assert after == sorted(after) and set(after) == set(range(saved, frames))
    # Not streamed (a known gap): frames before[-1] + 1 .. saved - 1, the ~1.5 s of frames the sink held or was handed
    # while it gave up; the checkpoint comes after them, so the resumed run cannot send them again.
