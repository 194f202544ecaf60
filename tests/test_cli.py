"""The command line as a user runs it: real processes, one-line errors, no tracebacks."""

import fractions
import os
import pickle
import shutil
import subprocess
import sys

import struct
import zlib

import av
import numpy as np
import pytest
import torch

import cli_process
from fifo_stream.outputs.file import FileSink
from media import write_tone
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
    (ws / "dir.m3u8").mkdir()
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
    damage_run_directories(ws, ws / "corrupt")
    write_bad_files(ws)
    return ws


def damage_run_directories(ws, intact):
    """Copies of an interrupted run, each with one file damaged as a crash or a hand edit would."""
    damages = {
        "badspec": ("run.json", lambda text: text[: len(text) // 2]),
        "typedspec": ("run.json", lambda text: text.replace('"frames": 6', '"frames": "six"')),
        "badcfg": ("config.yaml", lambda text: text.replace("sampling:", "sampling: [")),
        "keycfg": ("config.yaml", lambda text: text.replace("sampling:", "sampling:\n  partitionz: 2")),
        "badmanifest": ("manifest.json", lambda text: "{" + text[:10]),
        "fieldsmanifest": ("manifest.json", lambda text: text.replace('"frames_written"', '"frames_done"')),
    }
    for name, (file, damage) in damages.items():
        shutil.copytree(intact, ws / name)
        path = ws / name / file
        path.write_text(damage(path.read_text()))


def write_bad_files(ws):
    (ws / "syntax.yaml").write_text("sampling: [partitions\n  eta: 1\n")
    (ws / "list.yaml").write_text("- sampling\n- partitions\n")
    (ws / "typed.yaml").write_text("defaults: tiny-random\nsampling:\n  partitions: two\n")
    with open(ws / "plain.ckpt", "wb") as fh:  # a plain pickle (protocol 4): torch warns before refusing
        pickle.dump({"state_dict": {"w": [1.0, 2.0]}}, fh, protocol=4)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hparams": fractions.Fraction(1, 3)}, ws / "objects.ckpt")
    write_bad_footage(ws)


def write_bad_footage(ws):
    (ws / "notes.txt").write_text("not an image\n")
    (ws / "empty.png").write_bytes(b"")
    write_tone(ws / "tone.wav")  # audio only
    side = 9000  # a 1-bit PNG of 81 M pixels, 10 kB on disk
    rows = (b"\x00" + b"\x00" * ((side + 7) // 8)) * side
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    (ws / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    with FileSink(ws / "short.mp4", 96, 64, 8) as sink:  # 3 frames: less than one window of 8
        for i in range(3):
            sink.write(np.full((64, 96, 3), 40 * i, np.uint8))


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
    "refbank reference after the end": (GEN + ["--frames", "2", "consistency.refbank.enabled=true", "consistency.refbank.reference=5"], "after the video's last frame"),
    "negative seconds": (GEN + ["--seconds", "-2"], "at least one frame"),
    "boolean option given a number": (GEN + ["--frames", "2", "runtime.compile=2"], "runtime.compile=2 is invalid: it must be true or false"),
    "storyboard prompts not a list": (["generate", "--frames", "2", "--out", "out.mp4", "storyboard.prompts=abc"], "a list of 'N: text' entries"),
    "noise correlation out of range": (GEN + ["--frames", "2", "sampling.noise_alpha=2"], "sampling.noise_alpha=2.0 is invalid"),
    "unknown key in a section": (GEN + ["--frames", "2", "sampling.partition=2"], "valid keys in sampling: partitions"),
    "config with a YAML syntax error": (GEN + ["--frames", "2", "--config", "syntax.yaml"], "cannot read config syntax.yaml (line 2)"),
    "config that is not a mapping": (GEN + ["--frames", "2", "--config", "list.yaml"], "must be a YAML mapping"),
    "config file with a wrong type": (GEN + ["--frames", "2", "--config", "typed.yaml"], "sampling.partitions='two' is invalid: it must be an integer >= 1 (in typed.yaml"),
    "two stdout outputs": (GEN[:2] + ["--frames", "2", "--out", "-", "--out", "-"], "stdout carries one stream"),
    "the same file twice": (GEN + ["--frames", "2", "--out", "./out.mp4"], "name the same output"),
    "HLS playlist path is a directory": (["generate", "x", "--frames", "2", "--out", "dir.m3u8"], "HLS playlist path dir.m3u8 is a directory"),
    "two HLS playlists in one directory": (GEN + ["--frames", "2", "--out", "live/a.m3u8", "--out", "live/b.m3u8"], "are HLS playlists in one directory"),
    "an output inside segments/": (GEN[:2] + ["--frames", "2", "--run-dir", "fresh", "--out", "fresh/segments/x.mp4"], "inside the run directory's segments/"),
    "run directory is a file": (GEN + ["--frames", "2", "--run-dir", "blocker"], "is a file"),
    "unknown pipe format": (GEN[:2] + ["--frames", "2", "--out", "-", "--pipe-format", "avi"], "invalid choice: 'avi'"),
    "plain pickle checkpoint": (GEN + ["--frames", "2", "--ckpt", "plain.ckpt", "model.weights=checkpoint"], "plain.ckpt holds Python objects besides tensors and was NOT unpickled"),
    "checkpoint holding objects": (GEN + ["--frames", "2", "--ckpt", "objects.ckpt", "model.weights=checkpoint"], "was NOT unpickled"),
    "resume with a damaged run.json": (["resume", "badspec"], "run.json is damaged"),
    "resume with wrong types in run.json": (["resume", "typedspec"], "run.json is damaged (frames)"),
    "resume with a damaged config.yaml": (["resume", "badcfg"], "config.yaml is damaged or changed by hand"),
    "resume with an unknown key in config.yaml": (["resume", "keycfg"], "unknown config key 'sampling.partitionz'"),
    "resume with a damaged manifest": (["resume", "badmanifest"], "manifest.json is missing or damaged"),
    "resume with a manifest of other fields": (["resume", "fieldsmanifest"], "fields are not those of a manifest"),
    "info with a damaged run.json": (["info", "badspec"], "run.json is damaged"),
    "info with a damaged manifest": (["info", "badmanifest"], "manifest.json is missing or damaged"),
    "info with a damaged config.yaml": (["info", "badcfg"], "config.yaml is damaged"),
    "convert into a missing directory": (["convert", "objects.ckpt", "nowhere/x.safetensors"], "does not exist"),
    "convert of a directory": (["convert", "dir.mp4", "x.safetensors"], "is a directory"),
    "convert of objects without trust": (["convert", "objects.ckpt", "x.safetensors"], "was NOT unpickled"),
    "convert of a plain pickle": (["convert", "plain.ckpt", "x.safetensors"], "plain.ckpt holds Python objects besides tensors"),
    "init image missing": (GEN + ["--frames", "2", "--init-image", "nope.png"], "nope.png does not exist"),
    "init image is a directory": (GEN + ["--frames", "2", "--init-image", "dir.mp4"], "dir.mp4 is a directory"),
    "init image is a text file": (GEN + ["--frames", "2", "--init-image", "notes.txt"], "notes.txt is not a file FFmpeg can read"),
    "init image is empty": (GEN + ["--frames", "2", "--init-image", "empty.png"], "empty.png is empty (0 bytes)"),
    "init image is audio": (GEN + ["--frames", "2", "--init-image", "tone.wav"], "tone.wav has no picture in it"),
    "init image too large": (GEN + ["--frames", "2", "--init-image", "huge.png"], "huge.png is 9000x9000; images up to 67,108,864 pixels"),
    "init video too short": (GEN + ["--frames", "2", "--init-video", "short.mp4"], "has 3 frames at 8 fps; it needs at least 8"),
    "init video is audio only": (GEN + ["--frames", "2", "--init-video", "tone.wav"], "tone.wav has no video stream"),
    "init video missing": (GEN + ["--frames", "2", "--init-video", "nope.mp4"], "nope.mp4 does not exist"),
    "init strength out of range": (GEN + ["--frames", "2", "--init-video", "short.mp4", "--pad-short", "--init-strength", "1.5"], "a value from 0 to 1"),
    "init strength without footage": (GEN + ["--frames", "2", "--init-strength", "0.5"], "needs --init-image or --init-video"),
    "pad-short without a video": (GEN + ["--frames", "2", "--pad-short"], "--pad-short applies to --init-video"),
    "keep-input without a video": (GEN + ["--frames", "2", "--init-image", "short.mp4", "--keep-input"], "--keep-input applies to --init-video"),
    "init image and video together": (GEN + ["--frames", "2", "--init-image", "a.png", "--init-video", "b.mp4"], "not allowed with argument --init-image"),
    "unknown fit mode": (GEN + ["--frames", "2", "--init-image", "a.png", "--fit", "zoom"], "invalid choice: 'zoom'"),
    "reference image missing": (GEN + ["--frames", "2", "consistency.refbank.enabled=true", "consistency.refbank.reference=nope.png"], "nope.png does not exist"),
    "bank reference named start": (GEN + ["--frames", "2", "consistency.refbank.enabled=true", "consistency.refbank.reference=start"], "start does not exist"),
    "anchor reference after the end": (GEN + ["--frames", "2", "consistency.anchor.enabled=true", "consistency.anchor.reference=2"], "after the video's last frame"),
    "bank and anchor name other references": (GEN + ["--frames", "2", "consistency.refbank.enabled=true", "consistency.refbank.reference=a.png",
                                                     "consistency.anchor.enabled=true", "consistency.anchor.reference=start"], "give each the same path"),
}


def test_there_are_at_least_40_distinct_bad_inputs():
    assert len(BAD_INPUTS) >= 40 and len({tuple(args) for args, _ in BAD_INPUTS.values()}) == len(BAD_INPUTS)
    assert {args[0] for args, _ in BAD_INPUTS.values()} == {"generate", "resume", "info", "convert"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_harmless(workspace, case):
    args, message = BAD_INPUTS[case]
    before = snapshot(workspace)
    proc = cli_process.run(*args, cwd=workspace)
    assert_one_line_error(proc, message)
    assert snapshot(workspace) == before
    assert not (workspace / "runs").exists() and not (workspace / "out.mp4").exists()


@pytest.mark.parametrize("case", ["zero frames", "init video is audio only", "resume with a damaged run.json", "plain pickle checkpoint"])
def test_bad_input_through_the_entry_point(workspace, case):
    args, message = BAD_INPUTS[case]
    before = snapshot(workspace)
    assert_one_line_error(run_cli(*args, cwd=workspace), message)
    assert snapshot(workspace) == before


def test_a_refused_resume_lets_go_of_the_run_directory(workspace, capsys):
    from fifo_stream.cli import main
    from fifo_stream.runs import lock

    assert main(["resume", str(workspace / "done")]) != 0
    assert "already finished" in capsys.readouterr().err
    assert (workspace / "done").resolve() not in lock._held  # in-process callers (the API, tests) get it back
