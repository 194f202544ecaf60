"""One writer per run directory, "finished" only when verified, a full disk, and random SIGKILLs."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fifo_stream.outputs.file import FileSink
from test_run import cli, decoded_frames, finish, manifest

FRAMES, EVERY = 24, 4
ARGS = ["sampling.partitions=1", "--quiet"]


def generate_args(tmp, name):
    return ["generate", "a red circle", "--frames", str(FRAMES), "--checkpoint-every", str(EVERY),
            "--out", str(tmp / f"{name}.mp4"), "--run-dir", str(tmp / name), *ARGS]


def one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    rc, err = finish(cli(*generate_args(tmp, "ref")))
    assert rc == 0, err
    return manifest(tmp / "ref")["frame_sha256"], decoded_frames(tmp / "ref.mp4")


def assert_complete(tmp, name, reference):
    """The run made the reference's frames (RGB hashes) and its joined file holds every one of them.

    The encoded pixels are compared loosely: libx264 does not always repeat its bitstream for
    the same frames (seen under load: a few frames of a segment a level or two apart).
    """
    hashes, frames = reference
    m = manifest(tmp / name)
    assert m["finished"] and m["frame_sha256"] == hashes
    got = decoded_frames(tmp / f"{name}.mp4")
    assert len(got) == FRAMES
    assert all(np.abs(a.astype(int) - b.astype(int)).mean() < 2.0 for a, b in zip(got, frames))  # a wrong frame is ~40 off


def wait_for(path, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_second_process_on_a_running_directory_is_refused(tmp_path, reference):
    first = cli(*generate_args(tmp_path, "run"))
    wait_for(tmp_path / "run" / "run.json")
    started = time.monotonic()
    for args in (["resume", str(tmp_path / "run")], generate_args(tmp_path, "run")):
        rc, err = finish(cli(*args), timeout=60)
        assert rc == 2
        assert one_line(err) == f"fifo-stream: error: run directory {tmp_path / 'run'} is in use by process {first.pid}; wait for it or stop it"
    assert time.monotonic() - started < 60
    info = subprocess.run([sys.executable, "-m", "fifo_stream", "info", str(tmp_path / "run")], capture_output=True, text=True)
    assert info.returncode == 0 and (f"running (process {first.pid})" in info.stdout or "finished" in info.stdout)
    rc, err = finish(first)
    assert rc == 0, err
    assert_complete(tmp_path, "run", reference)


def test_a_killed_process_leaves_no_lock_behind(tmp_path, reference):
    rc, err = finish(cli(*generate_args(tmp_path, "run"), env={"FIFO_STREAM_FAULT": "frame:6"}))
    assert rc == -signal.SIGKILL
    rc, err = finish(cli("resume", str(tmp_path / "run"), "--quiet"))
    assert rc == 0, err
    assert_complete(tmp_path, "run", reference)


def test_a_short_joined_file_is_not_finished(tmp_path, reference):
    """A listed segment that lost frames: the joined file is checked and the run stays resumable."""
    rc, _ = finish(cli(*generate_args(tmp_path, "run"), env={"FIFO_STREAM_FAULT": "frame:10"}))
    assert rc == -signal.SIGKILL
    listed = manifest(tmp_path / "run")["segments"]["0"]
    assert len(listed) == 2
    damaged = tmp_path / "run" / "segments" / listed[0]["file"]
    with FileSink(damaged, 96, 64, 8, ext=".mp4") as sink:  # a finished video, but of one frame instead of four
        sink.write(decoded_frames(tmp_path / "run" / "segments" / listed[1]["file"])[0])
    rc, err = finish(cli("resume", str(tmp_path / "run"), "--quiet"))
    assert rc == 2
    line = one_line(err)
    assert f"{tmp_path / 'run.mp4'} holds {FRAMES - 3} frames" in line and "not marked finished" in line
    m = manifest(tmp_path / "run")
    assert not m["finished"] and m["frames_written"] == FRAMES


def test_a_kill_after_the_join_rejoins_on_resume(tmp_path, reference):
    rc, _ = finish(cli(*generate_args(tmp_path, "run"), env={"FIFO_STREAM_FAULT": "join:1"}))
    assert rc == -signal.SIGKILL and not manifest(tmp_path / "run")["finished"]
    rc, err = finish(cli("resume", str(tmp_path / "run"), "--quiet"))
    assert rc == 0, err
    assert_complete(tmp_path, "run", reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs: room for the run's first checkpoints, not for all of it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_stops_with_one_line_and_resumes_identically(small_disk, reference):
    rc, err = finish(cli(*generate_args(small_disk, "run")))
    assert rc == 3, err
    line = one_line(err)
    assert "No space left on device" in line and f"fifo-stream resume {small_disk / 'run'}" in line
    m = manifest(small_disk / "run")
    saved = m["frames_written"]
    assert 0 < saved < FRAMES and saved % EVERY == 0 and not m["finished"]
    assert sum(s["frames"] for s in m["segments"]["0"]) == saved
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    rc, err = finish(cli("resume", str(small_disk / "run"), "--quiet"))
    assert rc == 0, err
    assert_complete(small_disk, "run", reference)


def test_random_kills_end_frame_identical(tmp_path, reference):
    """Ten SIGKILLs of one run: in each checkpoint step, at six random moments, and after the join."""
    rng = random.Random(20261201)
    faults, last = ["segments:2", "manifest:1", "state:3"], "join:1"
    hit, kills, deadline = [], 0, time.monotonic() + 900
    while kills < 10:
        assert time.monotonic() < deadline
        fault = faults.pop(0) if faults else (last if kills == 9 else None)
        started = (tmp_path / "run" / "run.json").exists()
        args = ["resume", str(tmp_path / "run"), "--quiet"] if started else generate_args(tmp_path, "run")
        proc = cli(*args, env={"FIFO_STREAM_FAULT": fault} if fault else None)
        if fault is None:
            time.sleep(rng.uniform(2.0, 7.0))
            proc.send_signal(signal.SIGKILL)
        rc, err = finish(proc)
        assert rc in (0, -signal.SIGKILL), err
        if rc != 0:
            kills += 1
            hit += [fault] if fault else []
        if (tmp_path / "run" / "run.json").exists() and manifest(tmp_path / "run")["finished"]:
            # it finished before the kill landed: check it, then start over in a fresh directory
            assert_complete(tmp_path, "run", reference)
            os.rename(tmp_path / "run", tmp_path / f"done{kills}-{rng.random()}")
    assert hit == ["segments:2", "manifest:1", "state:3", "join:1"]
    if (tmp_path / "run" / "run.json").exists():
        rc, err = finish(cli("resume", str(tmp_path / "run"), "--quiet"))
    else:
        rc, err = finish(cli(*generate_args(tmp_path, "run")))
    assert rc == 0, err
    assert_complete(tmp_path, "run", reference)
