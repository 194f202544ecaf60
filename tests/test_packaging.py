"""The package runs from a wheel, outside the repository: configs and the embedded model ship inside it."""

import os
import shutil
import subprocess
import sys
import zipfile

import av

from conftest import ROOT

PROMPT = "a red circle moves right on a black background"


def test_wheel_runs_the_first_command_outside_the_repository(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "fifo_stream", source / "fifo_stream", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True, capture_output=True)
    (wheel,) = wheels.glob("fifo_stream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"fifo_stream/configs/tiny.yaml", "fifo_stream/assets/tiny-shapes.safetensors", "fifo_stream/models/unet.py"} <= set(names)

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FIFO_STREAM_CONFIG", "FIFO_STREAM_MODELS")}
    env["PYTHONPATH"] = str(site)
    where = subprocess.run([sys.executable, "-c", "import fifo_stream; print(fifo_stream.__file__)"], cwd=empty, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(site / "fifo_stream" / "__init__.py")

    done = subprocess.run([str(site / "bin" / "fifo-stream"), "generate", PROMPT, "--frames", "8", "--out", "x.mp4", "--quiet"],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with av.open(str(empty / "x.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8

    # A checkpoint that is nowhere is one line naming where it was looked for.
    missing = subprocess.run([str(site / "bin" / "fifo-stream"), "generate", PROMPT, "--frames", "8", "--out", "y.mp4", "--config", "videocrafter2"],
                             cwd=empty, env={**env, "FIFO_STREAM_MODELS": str(tmp_path / "mine")}, capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "checkpoint not found: model.ckpt" in missing.stderr and str(tmp_path / "mine") in missing.stderr
