"""The command line as a user runs it: real subprocesses, one-line errors, no tracebacks."""

import os
import subprocess
import sys

import av
import pytest
import torch

from synthetic import synthetic_state_dict


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fifo_stream", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def assert_one_line_error(proc, contains):
    assert proc.returncode != 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert contains in lines[0], lines[0]


def count_frames(path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_generate_writes_a_video(tmp_path):
    out = tmp_path / "clip.mp4"
    proc = run_cli("generate", "a red circle", "--frames", "5", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert count_frames(out) == 5
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    (d / "garbage.ckpt").write_bytes(b"\x00not a checkpoint")
    state = synthetic_state_dict()
    sd15 = {k: v for k, v in state.items() if "temopral_conv" not in k and "init_attn" not in k}
    sd15["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = torch.zeros(32, 32, 1, 1)
    torch.save({"state_dict": sd15}, d / "sd15.ckpt")
    return d


@pytest.mark.parametrize(
    "ckpt, message",
    [("missing.ckpt", "checkpoint not found"), ("garbage.ckpt", "not a PyTorch checkpoint"), ("sd15.ckpt", "does not fit the U-Net")],
)
def test_bad_checkpoints_give_one_line(bad_checkpoints, tmp_path, ckpt, message):
    out = tmp_path / "o.mp4"
    proc = run_cli("generate", "x", "--frames", "2", "--out", str(out), "--ckpt", str(bad_checkpoints / ckpt), "model.weights=checkpoint")
    assert_one_line_error(proc, message)
    assert not out.exists()


def test_convert_errors_are_one_line(tmp_path):
    assert_one_line_error(run_cli("convert", str(tmp_path / "nope.ckpt"), str(tmp_path / "o.safetensors")), "not found")
    assert_one_line_error(run_cli("convert", "a.ckpt", "b.bin"), ".safetensors")


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Existing outputs and run directories that bad commands must leave untouched."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "existing.mp4").write_bytes(b"an earlier video")
    (ws / "blocker").write_text("a file where a directory would be")
    (ws / "dir.mp4").mkdir()
    fast = ["sampling.partitions=1", "--quiet"]
    done = subprocess.run([sys.executable, "-m", "fifo_stream", "generate", "x", "--frames", "2", "--out", str(ws / "done.mp4"), "--run-dir", str(ws / "done"), *fast], capture_output=True)
    assert done.returncode == 0, done.stderr
    for name in ("corrupt", "changed"):
        proc = subprocess.run(
            [sys.executable, "-m", "fifo_stream", "generate", "x", "--frames", "6", "--checkpoint-every", "2", "--out", str(ws / f"{name}.mp4"), "--run-dir", str(ws / name), *fast],
            capture_output=True, env={**os.environ, "FIFO_STREAM_FAULT": "manifest:2"},
        )
        assert proc.returncode == -9 and (ws / name / "state.pt").exists(), proc.stderr
    state = ws / "corrupt" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    config = ws / "changed" / "config.yaml"
    config.write_text(config.read_text().replace("guidance_scale: 12.0", "guidance_scale: 7.5"))
    return ws


GEN = ["generate", "a red circle", "--out", "out.mp4"]
BAD_INPUTS = {
    "zero frames": (GEN + ["--frames", "0"], "at least one frame"),
    "negative frames": (GEN + ["--frames", "-3"], "at least one frame"),
    "zero seconds": (GEN + ["--seconds", "0"], "at least one frame"),
    "unknown config key": (GEN + ["--frames", "2", "foo.bar=1"], "unknown config key 'foo"),
    "bad override value": (GEN + ["--frames", "2", "sampling.partitions=abc"], "sampling.partitions"),
    "override without value": (GEN + ["--frames", "2", "sampling.partitions"], "unrecognized arguments"),
    "odd frames per window": (GEN + ["--frames", "2", "model.unet.temporal_length=7"], "temporal_length"),
    "partitions below one": (GEN + ["--frames", "2", "sampling.partitions=0"], "partitions"),
    "negative eta": (GEN + ["--frames", "2", "sampling.eta=-1"], "eta"),
    "resolution not divisible": (GEN + ["--frames", "2", "video.height=100"], "multiple of"),
    "unknown dtype": (GEN + ["--frames", "2", "runtime.dtype=fp8"], "runtime.dtype"),
    "unknown config name": (GEN + ["--frames", "2", "--config", "nope"], "config not found"),
    "unknown output scheme": (["generate", "x", "--frames", "2", "--out", "ftp://host/x"], "scheme"),
    "unknown extension": (["generate", "x", "--frames", "2", "--out", "out.xyz"], "extension"),
    "unwritable output directory": (["generate", "x", "--frames", "2", "--out", "blocker/out.mp4"], "not a writable directory"),
    "output path is a directory": (["generate", "x", "--frames", "2", "--out", "dir.mp4"], "is a directory"),
    "missing checkpoint": (GEN + ["--frames", "2", "--ckpt", "missing.ckpt"], "checkpoint not found"),
    "bad checkpoint interval": (GEN + ["--frames", "2", "--checkpoint-every", "0"], "checkpoint-every"),
    "run directory in use": (GEN + ["--frames", "2", "--run-dir", "done"], "already holds a run"),
    "corrupt engine checkpoint": (["resume", "corrupt"], "corrupt"),
    "resume with another config": (["resume", "changed"], "another config"),
    "resume of a finished run": (["resume", "done"], "already finished"),
    "resume of a non-run directory": (["resume", "dir.mp4"], "not a fifo-stream run directory"),
    "info of a missing run": (["info", "nowhere"], "not a fifo-stream run directory"),
    "no prompt": (["generate", "--frames", "2", "--out", "out.mp4", "sampling.partitions=1"], "no prompt given"),
    "storyboard frames not increasing": (GEN + ["--frames", "20", "--prompt", "5: b", "--prompt", "5: c"], "must increase: 5 follows 5"),
    "storyboard prompt without a frame": (["generate", "--prompt", "a", "--prompt", "b", "--frames", "2", "--out", "out.mp4"], "needs the frame"),
    "storyboard prompt after the end": (GEN + ["--frames", "8", "--prompt", "8: b"], "after the video's last frame"),
    "storyboard transition too long": (GEN + ["--frames", "20", "--prompt", "5: b", "storyboard.transition=6"], "closer than the 6-frame"),
    "unknown refbank layer": (GEN + ["--frames", "2", "consistency.refbank.enabled=true", "consistency.refbank.layers=[output_blocks.99]"], "names no spatial"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_harmless(workspace, case):
    args, message = BAD_INPUTS[case]
    before = snapshot(workspace)
    proc = run_cli(*args, cwd=workspace)
    assert_one_line_error(proc, message)
    assert snapshot(workspace) == before
    assert not (workspace / "runs").exists() and not (workspace / "out.mp4").exists()
