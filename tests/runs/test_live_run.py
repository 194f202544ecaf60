"""Live prompts from --prompts-from, --progress json and --preview-every, through the CLI as users run it."""

import json
import os
import subprocess
import sys

import av
import pytest

FRAMES = 30
PROMPT, LATER = "a red circle moves right on a black background", "a blue square moves left on a white background"
ARGS = ["--frames", str(FRAMES), "--checkpoint-every", "10", "sampling.partitions=1"]


def run(*args, env=None, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "fifo_stream", *args], input=stdin, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=300,
    )


def events(stderr: str) -> list[dict]:
    """Every stderr line must be one JSON object."""
    return [json.loads(line) for line in stderr.splitlines()]


def test_prompts_from_stdin_are_recorded_and_resume_makes_the_planned_run(tmp_path):
    live = tmp_path / "live"
    killed = run("generate", PROMPT, "--out", str(tmp_path / "live.mp4"), "--run-dir", str(live), "--prompts-from", "-",
                 "--progress", "json", "--preview-every", "5", *ARGS, env={"FIFO_STREAM_FAULT": "frame:22"},
                 stdin=f"# a comment\n{LATER}\n3: a dog\n")
    assert killed.returncode == -9
    seen = events(killed.stderr)
    added = [e for e in seen if e["event"] == "prompt"]
    assert len(added) == 1 and added[0]["prompt"] == LATER and added[0]["source"] == "prompts-from"
    frame = added[0]["frame"]
    refused = [e for e in seen if e["event"] == "error"]
    assert len(refused) == 1 and "prompt refused (prompts-from)" in refused[0]["message"]  # 'dog', or frame 3 already in the queue
    frames = [e for e in seen if e["event"] == "frame"]
    assert [e["frame"] for e in frames] == list(range(1, 23)) and all(e["total"] == FRAMES for e in frames)
    assert {e["prompt"] for e in frames if e["frame"] <= frame} == {PROMPT}
    assert {e["prompt"] for e in frames if e["frame"] > frame} == {LATER}
    assert [e["frame"] for e in seen if e["event"] == "checkpoint"] == [10, 20]
    assert json.loads((live / "run.json").read_text())["storyboard"] == [{"frame": 0, "prompt": PROMPT}, {"frame": frame, "prompt": LATER}]
    with av.open(str(live / "preview.jpg")) as c:
        assert next(c.decode(video=0)).to_ndarray(format="rgb24").shape == (64, 96, 3)  # tiny-random: 96x64

    resumed = run("resume", str(live), "--progress", "json")
    assert resumed.returncode == 0, resumed.stderr
    assert events(resumed.stderr)[-1] == {"event": "finished", "frame": FRAMES}
    planned = run("generate", PROMPT, "--prompt", f"{frame}: {LATER}", "--out", str(tmp_path / "planned.mp4"),
                  "--run-dir", str(tmp_path / "planned"), "--quiet", *ARGS)
    assert planned.returncode == 0, planned.stderr
    hashes = [json.loads((d / "manifest.json").read_text())["frame_sha256"] for d in (live, tmp_path / "planned")]
    assert len(hashes[0]) == FRAMES and hashes[0] == hashes[1]


@pytest.mark.parametrize("args, message", [
    (["--prompts-from", "missing.txt"], "cannot read --prompts-from missing.txt"),
    (["--serve", "0.0.0.0:8000"], "reachable from other machines; add --serve-token"),
    (["--serve", "localhost:x"], "is not [HOST:]PORT"),
    (["--serve-token", "t"], "--serve-token needs --serve"),
    (["--preview-every", "-1"], "--preview-every must be >= 0"),
])
def test_bad_live_options_are_one_line_and_write_nothing(tmp_path, args, message):
    proc = run("generate", PROMPT, "--out", str(tmp_path / "x.mp4"), "--run-dir", str(tmp_path / "r"), *args, *ARGS)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "r").exists() and not (tmp_path / "x.mp4").exists()
