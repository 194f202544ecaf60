"""Exact resume after kill -9, pipes to a reader, live RTMP: the CLI as users run it."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import av
import numpy as np
import pytest

import cli_process

FRAMES, EVERY = 12, 3
ARGS = ["sampling.partitions=1"]  # S = f: no warm-up ticks, so each process starts emitting at once
FFPROBE = shutil.which("ffprobe")


def cli(*args, env=None, **kw):
    """The command, started; with pipes given (``stdout=``, ``stdin=``) through ``python -m fifo_stream``."""
    env = {**os.environ, **(env or {})}
    if not kw:
        return cli_process.start(*args, env=env)
    return subprocess.Popen([sys.executable, "-m", "fifo_stream", *args], stdout=kw.pop("stdout", subprocess.DEVNULL),
                            stderr=subprocess.PIPE, env=env, **kw)


def finish(proc, timeout=300):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode() if isinstance(err, bytes) else err


def manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def decoded_frames(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def playlist(out):
    """The HLS playlist that :func:`generate` writes beside the video file ``out``."""
    return out.with_name(f"{out.stem}-hls") / "index.m3u8"


def generate(tmp, name, env=None):
    run_dir, out = tmp / name, tmp / f"{name}.mp4"
    args = ["generate", "a red circle", "--frames", str(FRAMES), "--checkpoint-every", str(EVERY),
            "--out", str(out), "--out", str(tmp / f"{name}.mkv"), "--out", str(playlist(out)), "--run-dir", str(run_dir),
            "--quiet", *ARGS, "output.hls_segment_seconds=0.25"]  # 2 frames a segment, and one ends at each checkpoint
    return cli(*args, env=env), run_dir, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    proc, run_dir, out = generate(tmp, "ref")
    rc, err = finish(proc)
    assert rc == 0, err
    return manifest(run_dir), out


def test_sigkill_at_three_points_resumes_frame_identically(reference, tmp_path):
    ref_manifest, ref_out = reference
    assert len(ref_manifest["frame_sha256"]) == FRAMES and ref_manifest["finished"]

    # 1: killed inside the 2nd checkpoint, mid-way through replacing the manifest
    #    (its new content written to a temporary file, not yet renamed into place).
    proc, run_dir, out = generate(tmp_path, "run", env={"FIFO_STREAM_FAULT": "manifest:2"})
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL
    assert manifest(run_dir)["frames_written"] == EVERY and (run_dir / "manifest.json.tmp").exists()
    assert not out.exists()

    # 2: killed inside the 2nd checkpoint of the resumed process, after cutting segments.
    rc, _ = finish(cli("resume", str(run_dir), "--quiet", env={"FIFO_STREAM_FAULT": "segments:2"}))
    assert rc == -signal.SIGKILL

    # 3: killed between checkpoints, with frames already encoded into an unfinished segment.
    rc, _ = finish(cli("resume", str(run_dir), "--quiet", env={"FIFO_STREAM_FAULT": f"frame:{2 * EVERY + 2}"}))
    assert rc == -signal.SIGKILL and not manifest(run_dir)["finished"]
    assert any(p.name.endswith(".partial") for p in (run_dir / "segments").iterdir())

    rc, err = finish(cli("resume", str(run_dir), "--quiet"))
    assert rc == 0, err
    final = manifest(run_dir)
    assert final["finished"] and final["frame_sha256"] == ref_manifest["frame_sha256"]
    frames = decoded_frames(out)
    assert len(frames) == FRAMES
    assert len(decoded_frames(tmp_path / "run.mkv")) == FRAMES
    # Same encoder input and settings: the joined file decodes exactly like the uninterrupted one.
    assert all((a == b).all() for a, b in zip(frames, decoded_frames(ref_out)))
    # The playlist lists the same segments; each resume that continued it marked a discontinuity.
    assert playlist(out).read_text().replace("#EXT-X-DISCONTINUITY\n", "") == playlist(ref_out).read_text()


@pytest.mark.skipif(FFPROBE is None, reason="needs ffprobe (Debian: apt-get install ffmpeg)")
def test_hls_playlist_is_live_until_the_end_and_resumes_seamlessly(reference, tmp_path):
    def frames_read(path):  # as a client reads them
        out = subprocess.run([FFPROBE, "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                              "stream=nb_read_frames", "-of", "csv=p=0", str(path)], capture_output=True, text=True, timeout=60)
        return int(out.stdout.split()[0])

    ref = playlist(reference[1])
    assert ref.read_text().endswith("#EXT-X-ENDLIST\n") and frames_read(ref) == FRAMES
    # Killed after frame 8 (the last checkpoint at 6): live, maybe with segments after the checkpoint.
    proc, run_dir, out = generate(tmp_path, "run", env={"FIFO_STREAM_FAULT": f"frame:{2 * EVERY + 2}"})
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL
    text = playlist(out).read_text()
    assert "#FIFO-STREAM-FRAMES:3,2\n" in text and "#EXT-X-ENDLIST" not in text
    rc, err = finish(cli("resume", str(run_dir), "--quiet"))
    assert rc == 0, err
    text = playlist(out).read_text()
    assert text.replace("#EXT-X-DISCONTINUITY\n", "", 1) == ref.read_text()
    assert frames_read(playlist(out)) == FRAMES
    got, want = decoded_frames(playlist(out)), decoded_frames(ref)
    # libx264 is not bit-exact under load (see test_integrity); a wrong frame is ~40 levels off.
    assert len(got) == FRAMES and all(np.abs(a.astype(int) - b.astype(int)).mean() < 2.0 for a, b in zip(got, want))


def test_sigterm_checkpoints_and_resumes(reference, tmp_path):
    ref_manifest, _ = reference
    run_dir = tmp_path / "run"
    proc = cli("generate", "a red circle", "--frames", "60", "--checkpoint-every", str(EVERY), "--out", str(tmp_path / "run.mkv"),
               "--run-dir", str(run_dir), "--quiet", *ARGS)
    deadline = time.time() + 120
    while not (run_dir / "state.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err
    assert "resume" in err and "Traceback" not in err
    stopped = manifest(run_dir)
    assert EVERY <= stopped["frames_written"] < 60 and not stopped["finished"]
    # Same prompt, seed and config: the run's frames start with the reference run's.
    rc, err = finish(cli("resume", str(run_dir), "--quiet"))
    assert rc == 0, err
    assert manifest(run_dir)["frame_sha256"][:FRAMES] == ref_manifest["frame_sha256"]
    assert len(decoded_frames(tmp_path / "run.mkv")) == 60


def test_pipe_to_a_reader_and_reader_going_away(tmp_path):
    n = 6
    proc = cli("generate", "a red circle", "--frames", str(n), "--out", "-", "--run-dir", str(tmp_path / "p1"), "--quiet", *ARGS, stdout=subprocess.PIPE)
    with av.open(proc.stdout, "r", format="matroska") as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    rc, err = finish(proc)
    assert rc == 0, err
    assert len(frames) == n and frames[0].shape == (64, 96, 3)

    proc = cli("generate", "x", "--frames", "3", "--out", "-", "--pipe-format", "rawvideo", "--run-dir", str(tmp_path / "raw"), "--quiet", *ARGS, stdout=subprocess.PIPE)
    raw, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and len(raw) == 3 * 64 * 96 * 3

    run_dir = tmp_path / "p2"
    proc = cli("generate", "a red circle", "--frames", "500", "--out", "-", "--run-dir", str(run_dir), "--quiet", *ARGS, stdout=subprocess.PIPE)
    with av.open(proc.stdout, "r", format="matroska") as c:
        for i, _ in enumerate(c.decode(video=0)):
            if i == 1:
                break
    proc.stdout.close()
    rc, err = finish(proc)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 3 and len(lines) == 1 and "resume" in lines[0], err
    assert (run_dir / "state.pt").exists() and manifest(run_dir)["frames_written"] >= 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rtmp_receives_frames_at_real_time_pace(tmp_path):
    port, fps, n = free_port(), 8, 16
    url = f"rtmp://127.0.0.1:{port}/live/test"
    received, times = [], []

    def listen():
        try:
            with av.open(url, "r", format="flv", options={"listen": "1", "timeout": "60"}) as c:
                for frame in c.decode(video=0):
                    received.append((frame.width, frame.height))
                    times.append(time.monotonic())
        except av.error.OSError:  # the sender hanging up ends the stream
            pass

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.5)
    start = time.monotonic()
    rc, err = finish(cli("generate", "a red circle", "--frames", str(n), "--out", url, "--run-dir", str(tmp_path / "r"), "--quiet", *ARGS, "video.fps=8"))
    assert rc == 0, err
    listener.join(timeout=30)
    assert received and set(received) == {(96, 64)}
    # Paced to real time: the stream lasts as long as its frames do (late frames are repeated,
    # nothing is sent faster than fps). The receiver's probing buffers the first frames, so
    # the wall clock is taken over the whole transmission.
    assert len(received) >= n
    assert times[-1] - start >= 0.8 * (len(received) - 1) / fps


def test_rtmp_unreachable_is_one_line(tmp_path):
    rc, err = finish(cli("generate", "x", "--frames", "2", "--out", f"rtmp://127.0.0.1:{free_port()}/live/x", "--run-dir", str(tmp_path / "r"), "--quiet", *ARGS))
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "extra",
    [
        ["sampling.tail_noise=mixed", "consistency.shared_noise=0.5"],
        ["sampling.tail_noise=coherent"],
        ["consistency.qcache.enabled=true", "consistency.qcache.strength_min=0.2", "consistency.anchor.enabled=true", "consistency.anchor.reference=2"],
        # The new controls together (one run keeps the suite fast): each carries state over the crash.
        ["consistency.refbank.enabled=true", "consistency.refbank.momentum=0.5", "consistency.refbank.reference=1",
         "--prompt", "4: a blue square", "storyboard.transition=2", "sampling.tail_noise=dependency"],
    ],
    ids=["mixed-and-shared-noise", "coherent-noise", "qcache-anchor", "refbank-storyboard-dependency-noise"],
)
def test_consistency_controls_resume_frame_identically(tmp_path, extra):
    def start(name, env=None):
        return cli("generate", "a red circle", "--frames", "8", "--checkpoint-every", "3", "--out", str(tmp_path / f"{name}.mkv"),
                   "--run-dir", str(tmp_path / name), "--quiet", *ARGS, *extra, env=env)

    rc, err = finish(start("straight"))
    assert rc == 0, err
    rc, _ = finish(start("crashed", env={"FIFO_STREAM_FAULT": "frame:5"}))
    assert rc == -signal.SIGKILL
    rc, err = finish(cli("resume", str(tmp_path / "crashed"), "--quiet"))
    assert rc == 0, err
    assert manifest(tmp_path / "crashed")["frame_sha256"] == manifest(tmp_path / "straight")["frame_sha256"]
    if "--prompt" in extra:  # the schedule is part of the run: kept by resume, shown by info
        info = subprocess.run([sys.executable, "-m", "fifo_stream", "info", str(tmp_path / "crashed")], capture_output=True, text=True)
        assert "storyboard:  frame 0: a red circle\n             frame 4: a blue square\ntransition:  2 frames\n" in info.stdout
