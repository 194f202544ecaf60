"""Noise-schedule arithmetic of VideoCrafter2 (computed in float64, as upstream)."""

from __future__ import annotations

import torch


def alphas_cumprod(num_train_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> torch.Tensor:
    """Cumulative products of alphas for betas = linspace(sqrt(start), sqrt(end), N)^2 (float64)."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def fifo_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """FIFO's ascending timesteps round(linspace(0, N-1, S)): level index 0 is the least noisy."""
    return torch.linspace(0, num_train_timesteps - 1, steps, dtype=torch.float64).round().long()


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """VideoCrafter's uniform DDIM timesteps range(0, N, N // S) + 1, ascending (as upstream, more than S of them where S does not divide N)."""
    return torch.arange(0, num_train_timesteps, num_train_timesteps // steps) + 1


def step_values(values: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v[t_i], v[t_(i-1)]) along an ascending DDIM schedule, with v[0] as the "previous" of step 0."""
    return values[timesteps], torch.cat([values[:1], values[timesteps[:-1]]])


def scale_arr(num_train_timesteps: int = 1000, start: float = 1.0, end: float = 0.7, mid_step: int = 400) -> torch.Tensor:
    """VideoCrafter2's optional ``use_scale`` factors: linspace(start, end, mid_step) then N x end."""
    return torch.cat([torch.linspace(start, end, mid_step, dtype=torch.float64), torch.full((num_train_timesteps,), end, dtype=torch.float64)])
