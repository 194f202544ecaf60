"""The schedule against diffusers' DDIMScheduler with the same settings (an independent implementation)."""

import pytest
import torch
from diffusers import DDIMScheduler

from fifo_stream.sampling.schedule import alphas_cumprod, ddim_timesteps, fifo_timesteps, step_values

SETTINGS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
FLOAT32_ULP = 2.0**-23


def test_alphas_match_diffusers_to_float32_rounding():
    ours = alphas_cumprod(1000, 0.00085, 0.012)
    theirs = DDIMScheduler(**SETTINGS).alphas_cumprod  # computed in float32
    assert ours.dtype == torch.float64
    relative = ((ours - theirs.double()) / ours).abs().max()
    # a cumulative product of 1000 float32 factors: ~1000 roundings of 2^-24 at worst, measured 9.5e-7
    assert relative <= 16 * FLOAT32_ULP
    assert not torch.equal(ours.float(), theirs)  # diffusers' float32 product differs from our float64 one, rounded


@pytest.mark.parametrize("steps", [10, 16, 25, 50, 64])
def test_videocrafter_ddim_timesteps_are_diffusers_leading_spacing_with_offset_1(steps):
    scheduler = DDIMScheduler(**SETTINGS, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    ours, theirs = ddim_timesteps(steps), scheduler.timesteps.flip(0)
    # VideoCrafter takes range(0, N, N // S): one or more extra steps where S does not divide N.
    assert len(ours) == len(range(0, 1000, 1000 // steps)) >= steps
    assert torch.equal(ours[:steps], theirs)
    # The DDIM step's alphas: a_prev of the first step is alphas_cumprod[0] (diffusers' final alpha).
    a_t, a_prev = step_values(alphas_cumprod(), ours[:steps])
    acp = scheduler.alphas_cumprod.double()
    prev = [int(t) - 1000 // steps for t in theirs]
    expected_prev = torch.stack([acp[p] if p >= 0 else scheduler.final_alpha_cumprod.double() for p in prev])
    assert ((a_t - acp[theirs]) / a_t).abs().max() <= 16 * FLOAT32_ULP
    assert ((a_prev - expected_prev) / a_prev).abs().max() <= 16 * FLOAT32_ULP


@pytest.mark.parametrize("steps", [16, 50, 64])
def test_fifo_timesteps_are_diffusers_linspace_spacing(steps):
    scheduler = DDIMScheduler(**SETTINGS, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    assert torch.equal(fifo_timesteps(steps), scheduler.timesteps.flip(0))
