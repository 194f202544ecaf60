"""Level-shared noise: unit variance, the designed correlation between frames, exact resume, refusal of another strength."""

import numpy as np
import pytest
import torch
from conftest import straight_and_resumed

from fifo_stream.config import load_config
from fifo_stream.errors import FifoStreamError
from fifo_stream.models.loading import load_model
from fifo_stream.pipeline import FrameStream
from fifo_stream.sampling.schedule import fifo_timesteps
from fifo_stream.sampling.shared_noise import SharedNoise

SHAPE = (1, 4, 8, 12)
LEVELS = fifo_timesteps(16)


def test_strength_zero_is_the_fresh_noise_itself():
    fresh = torch.randn(1, 4, 3, 8, 12)
    assert SharedNoise(SHAPE, LEVELS, seed=0, strength=0.0)(fresh, LEVELS[5]) is fresh


@pytest.mark.parametrize("strength", [0.3, 0.9])
def test_unit_variance_and_the_shared_fraction_between_frames_at_one_level(strength):
    # Over an ensemble of runs (seeds), two frames' noise at the same level correlates by the
    # strength, at different levels not at all, and every element keeps unit variance.
    seeds = 400
    same, other = [], []
    for seed in range(seeds):
        mix = SharedNoise(SHAPE, LEVELS, seed=seed, strength=strength)
        g = torch.Generator().manual_seed(10_000 + seed)
        fresh = torch.randn((1, 4, 3, 8, 12), generator=g)
        x = mix(fresh, torch.stack([LEVELS[9], LEVELS[9], LEVELS[2]]))
        same.append(x[:, :, :2])
        other.append(x[:, :, ::2])
    same, other = (torch.stack(v).double() for v in (same, other))
    assert abs(same.var().item() - 1) < 0.03
    per_element = same.reshape(seeds, -1).var(dim=0)
    assert per_element.min() > 0.7 and per_element.max() < 1.3
    assert abs((same[:, :, :, 0] * same[:, :, :, 1]).mean().item() - strength) < 0.03
    assert abs((other[:, :, :, 0] * other[:, :, :, 1]).mean().item()) < 0.03


def test_a_timestep_between_levels_takes_the_nearest_levels_component():
    mix = SharedNoise(SHAPE, LEVELS, seed=1, strength=1.0)
    zero = torch.zeros(1, 4, 1, 8, 12)
    for t, level in ((LEVELS[3] + 1, 3), (LEVELS[3] - 2, 3), (993, 15), (1, 0)):
        assert torch.equal(mix(zero, int(t))[:, :, 0], mix.components[level])


def test_the_components_are_a_function_of_the_seed():
    a, b, c = (SharedNoise(SHAPE, LEVELS, seed=s, strength=0.5).components for s in (4, 4, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny-random", ["consistency.shared_noise=0.7"])
    return cfg, load_model(cfg)


def test_runs_with_shared_noise_resume_exactly_and_differ_from_plain(tiny, tmp_path):
    cfg, model = tiny
    straight, resumed = straight_and_resumed(model, cfg, "a blue square", 3, split=2, total=5, tmp_path=tmp_path)
    assert all(np.array_equal(x, y) for x, y in zip(straight, resumed))
    plain = FrameStream(model, load_config("tiny-random"), "a blue square", seed=3)
    assert not np.array_equal(next(plain), straight[0])


def test_a_checkpoint_of_another_strength_is_refused(tiny, tmp_path):
    cfg, model = tiny
    stream = FrameStream(model, cfg, "a blue square", seed=3)
    next(stream)
    state = stream.state_dict()
    other = FrameStream(model, load_config("tiny-random", ["consistency.shared_noise=0.2"]), "a blue square", seed=3)
    with pytest.raises(FifoStreamError, match="consistency.shared_noise=0.7, not 0.2"):
        other.load_state_dict(state)
