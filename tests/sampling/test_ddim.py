"""Plain DDIM's per-step correction of the predicted clean sample (what the subject anchor holds the base clip with)."""

import torch

from fifo_stream.sampling.ddim import sample_ddim
from fifo_stream.sampling.schedule import alphas_cumprod, ddim_timesteps

ALPHAS = alphas_cumprod(1000, 0.00085, 0.012)
NOISE = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0))


def unet(x, t, ctx, attention_kwargs, branches):
    """A stand-in U-Net whose guided eps depends on x and the branch's context (branches stacked)."""
    return torch.cat([0.1 * x + c.mean() for c in ctx.chunk(branches)])


def run(correct_x0=None, eta=0.0):
    cond, uncond = torch.ones(1, 2, 8), torch.zeros(1, 2, 8)
    return sample_ddim(unet, NOISE, cond, uncond, ALPHAS, 5, 3.0, eta, torch.Generator().manual_seed(1), correct_x0=correct_x0)


def test_the_correction_sees_every_step_from_the_noisiest_and_replaces_its_prediction():
    seen = []

    def unchanged(x0, i):
        seen.append(i)
        return x0

    assert torch.equal(run(unchanged, eta=1.0), run(eta=1.0))  # returning its input leaves the steps as they are
    assert seen == [4, 3, 2, 1, 0]
    # x0 held at h in every step: each step keeps the noise part (x - sqrt(a) h) / sqrt(1 - a), whatever the U-Net says
    h = torch.full_like(NOISE, 0.5)
    first, last = ALPHAS[ddim_timesteps(5)[-1]].float(), ALPHAS[0].float()
    want = last.sqrt() * h + (1 - last).sqrt() * (NOISE - first.sqrt() * h) / (1 - first).sqrt()
    assert torch.allclose(run(lambda x0, i: h), want, atol=1e-6)
    assert not torch.allclose(run(), want, atol=0.1)
