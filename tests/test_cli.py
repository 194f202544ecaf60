"""The command line as a user runs it: real subprocesses, one-line errors, no tracebacks."""

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
