"""Level-shared noise: every frame meets the same noise component at each noise level.

What a prompt leaves open (a body color, a hat) is decided by the noise a frame is denoised
with, at the high levels. In FIFO every frame is denoised with noise of its own (the tail
latent and, with eta > 0, fresh noise at every step), so each new frame decides afresh and the
video drifts. Here every noise latent that enters a frame at level k is

    sqrt(a) S_k + sqrt(1 - a) fresh,

with S_k one fixed standard-normal latent per level (seeded) and ``a`` the shared fraction of
the variance (``consistency.shared_noise``). Every frame thus follows frame 0's noise
trajectory in part, and makes the same open choices; the fresh part keeps frames free to move.
S and the fresh draw are independent standard normals, so each element keeps unit variance;
a = 0 is the plain sampler, draw for draw. (FreeNoise reuses one set of initial noise
frames over a long video; PYoCo's mixed noise shares one component among a clip's frames.)
"""

from __future__ import annotations

import torch


class SharedNoise:
    """Mixes fresh noise with a per-level component shared by every frame of a run.

    ``shape`` is one latent frame (b, c, h, w); ``timesteps`` the FIFO levels' timesteps, one
    component each. Noise entering at another timestep (the base clip's DDIM schedule) takes
    the component of the nearest level. The components are a pure function of ``seed``, so a
    resumed run or another rank rebuilds them.
    """

    def __init__(self, shape: tuple[int, ...], timesteps: torch.Tensor, seed: int, strength: float, device: torch.device | str = "cpu"):
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"shared noise strength must be in [0, 1], got {strength}")
        self.strength = float(strength)
        self.timesteps = timesteps.to(device)
        g = torch.Generator(device=device).manual_seed(seed)
        self.components = torch.randn((len(timesteps), *shape), generator=g, device=device)  # (S, b, c, h, w)

    def __call__(self, fresh: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """``fresh`` (b, c, F, h, w), entering at ``timestep`` (one, or one per frame (F,)), mixed with its level's component."""
        if self.strength == 0.0:
            return fresh
        t = torch.as_tensor(timestep, device=self.timesteps.device).reshape(-1)
        level = (t[:, None] - self.timesteps[None]).abs().argmin(1)
        shared = self.components[level].permute(1, 2, 0, 3, 4)  # (b, c, F or 1, h, w)
        return self.strength**0.5 * shared.to(fresh) + (1 - self.strength) ** 0.5 * fresh
