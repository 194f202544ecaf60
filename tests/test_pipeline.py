"""Prompt-to-frames API on the tiny-random model: frame format, warm-up discard, exact resume."""

import numpy as np
import pytest
import torch

from conftest import straight_and_resumed
from fifo_stream.config import load_config
from fifo_stream.models.loading import load_model
from fifo_stream.pipeline import FrameStream, generate


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny-random")
    return cfg, load_model(cfg)


def test_frames_are_uint8_images(tiny):
    cfg, model = tiny
    frames = list(generate(model, cfg, "a red circle", 3, seed=1, progress=False))
    assert len(frames) == 3
    for f in frames:
        assert isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.shape == (cfg.video.height, cfg.video.width, 3)
    assert not np.array_equal(frames[0], frames[2])


def test_warmup_discard_drops_exactly_the_first_s_minus_f_ticks(tiny):
    cfg, model = tiny
    kept = FrameStream(model, cfg, "a red circle", seed=2)
    warm = kept.settings.warmup_frames
    assert warm == kept.settings.steps - kept.settings.frames > 0
    cfg_all = load_config("tiny-random", ["sampling.discard_warmup=false"])
    every = FrameStream(model, cfg_all, "a red circle", seed=2)
    a = [kept.next_latent() for _ in range(2)]
    b = [every.next_latent() for _ in range(warm + 2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b[warm:]))


def test_resume_from_saved_state_is_exact(tiny, tmp_path):
    cfg, model = tiny
    reference, resumed = straight_and_resumed(model, cfg, "a blue square", seed=3, split=2, total=5, tmp_path=tmp_path)
    for x, y in zip(reference, resumed):
        assert np.array_equal(x, y)
