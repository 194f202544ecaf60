"""Sources of the fresh noise latents that enter the FIFO queue's tail.

Every source is seeded, returns one (b, c, h, w) latent per call, and round-trips
its whole state through ``state_dict`` so a resumed run draws the same noise.
"""

from __future__ import annotations

import torch


class IIDNoise:
    """Independent standard normal noise per tail latent (the FIFO-Diffusion reference)."""

    def __init__(self, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu"):
        self.shape = tuple(shape)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = torch.device(device)

    def __call__(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, device=self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class RecordedNoise:
    """Replays a recorded stream of tail latents (T, b, c, h, w), e.g. a reference run's."""

    def __init__(self, noises: torch.Tensor):
        self.noises = noises
        self.index = 0

    def __call__(self) -> torch.Tensor:
        if self.index >= len(self.noises):
            raise IndexError(f"recorded noise exhausted after {len(self.noises)} latents")
        self.index += 1
        return self.noises[self.index - 1]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])
