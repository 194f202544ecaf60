import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("FIFO_STREAM_FIXTURES", ROOT.parent / "shared" / "fixtures"))
# Commands run without --config use the fast random-weight model; tests of the embedded
# default model (tests/test_tiny_model.py) name it or clear this.
os.environ["FIFO_STREAM_CONFIG"] = "tiny-random"
# Under pytest-xdist (README's `-n 2`) each worker, and every process it starts, computes on one
# thread: two workers fill the two cores without oversubscribing them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def load_fixture(name: str):
    """A reference fixture (see ../shared/fixtures/README.md); every shape and setting comes from it."""
    path = FIXTURES / name
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def checkpoint_key_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the full VideoCrafter2 checkpoint with its shape (``()`` for 0-dim tensors)."""
    shapes = {}
    for line in load_fixture("videocrafter2_checkpoint_keys.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        shapes[key] = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
    return shapes


def straight_and_resumed(model, cfg, prompt: str, seed: int, split: int, total: int, tmp_path: Path) -> tuple[list, list]:
    """``total`` frames of one FrameStream, and the same frames from one saved after ``split`` frames and
    resumed in another (whose frame count must go on from the saved one's)."""
    from fifo_stream.pipeline import FrameStream

    straight = FrameStream(model, cfg, prompt, seed=seed)
    frames = [next(straight) for _ in range(total)]
    first = FrameStream(model, cfg, prompt, seed=seed)
    head = [next(first) for _ in range(split)]
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = FrameStream(model, cfg, prompt, seed=seed)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    tail = [next(second) for _ in range(total - split)]
    assert second.emitted == total
    return frames, head + tail
