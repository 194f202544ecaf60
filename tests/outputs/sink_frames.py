"""What the output tests share: numbered test frames, decoding, child processes, free ports."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
