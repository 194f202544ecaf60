"""Small pure sampling functions: guided noise prediction, the DDIM update, plain DDIM."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..models.attention import rows_of
from .schedule import ddim_timesteps, step_values

# unet(x, timesteps, context, attention_kwargs, branches) -> eps (see UNet3D.forward's ``branches``)
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "dict[str, Any] | None", int], torch.Tensor]


def guided_eps(
    unet: UNetFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    max_batch: int | None = None,
    attention_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Classifier-free guidance eps_u + s (eps_c - eps_u).

    ``x`` (B, c, f, h, w), ``timesteps`` (B, f), contexts (B, n, d) or (B, f, n, d).
    Each U-Net call runs both branches of its samples (the layers before cross-attention once
    per sample); ``max_batch`` caps the rows per call (1: one branch per call).
    ``attention_kwargs`` describe the 2B rows, conditional first (see :func:`rows_of`).
    """
    B = x.shape[0]
    per_call = max_batch or 2 * B
    branches = 2 if per_call >= 2 else 1
    samples = per_call // branches
    contexts, eps = (cond, uncond), ([], [])
    for i in range(0, B, samples):
        s = slice(i, min(i + samples, B))
        for first in range(0, 2, branches):
            which = range(first, first + branches)
            rows = torch.cat([torch.arange(s.start, s.stop) + k * B for k in which])
            e = unet(x[s], timesteps[s], torch.cat([contexts[k][s] for k in which]), rows_of(attention_kwargs, rows), branches)
            for k, part in zip(which, e.chunk(branches)):
                eps[k].append(part)
    eps_c, eps_u = (torch.cat(parts) for parts in eps)
    return eps_u + scale * (eps_c - eps_u)


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    a_t: torch.Tensor,
    a_prev: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    scale_t: torch.Tensor | float = 1.0,
    scale_prev: torch.Tensor | float = 1.0,
    clip_x0: float | None = None,
    correct_x0: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One DDIM update x_t -> x_prev; ``a_t``/``a_prev`` broadcast against ``x`` (per slot or scalar).

    ``scale_t``/``scale_prev`` are VideoCrafter2's optional ``use_scale`` factors (1 = off).
    ``clip_x0`` clamps the predicted clean sample to [-clip_x0, clip_x0] and re-derives eps
    from it (DDPM's ``clip_denoised``, for pixel-space models whose data is bounded);
    ``correct_x0`` likewise replaces the predicted clean sample by its result (a consistency
    control); returning its input itself leaves the step as it is.
    """
    pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt() / scale_t
    predicted = pred_x0
    if clip_x0 is not None:
        pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
    if correct_x0 is not None:
        pred_x0 = correct_x0(pred_x0)
    if pred_x0 is not predicted:
        eps = (x - a_t.sqrt() * scale_t * pred_x0) / (1 - a_t).sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x_prev = a_prev.sqrt() * scale_prev * pred_x0 + (1 - a_prev - sigma**2).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


@torch.no_grad()
def sample_ddim(
    unet: UNetFn,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    alphas: torch.Tensor,
    steps: int,
    scale: float,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    scales: torch.Tensor | None = None,
    clip_x0: float | None = None,
    x0: torch.Tensor | None = None,
    strength: float = 1.0,
    noise_mix: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    correct_x0: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Plain guided DDIM from ``noise`` (b, c, f, h, w) over VideoCrafter's uniform timesteps.

    ``scales`` is the optional ``use_scale`` array indexed by timestep; ``clip_x0`` as in :func:`ddim_step`.
    With ``x0`` (SDEdit) sampling starts from ``x0`` noised with ``noise`` to the step
    ``round(strength * steps)`` and runs the steps below it: 0 returns ``x0``, 1 runs them all.
    ``noise_mix(noise, t)`` transforms every noise latent that enters at timestep ``t``, the
    starting noise included (e.g. :class:`~fifo_stream.sampling.shared_noise.SharedNoise`).
    ``correct_x0(x0, i)`` replaces step ``i``'s predicted clean sample (:func:`ddim_step`'s ``correct_x0``;
    ``i`` counts up from the least noisy step, as FIFO's level indices do).
    """
    mix = noise_mix or (lambda z, i: z)
    ts = ddim_timesteps(steps, len(alphas))
    a_t, a_prev = (v.float() for v in step_values(alphas, ts))
    s_t, s_prev = (v.float() for v in step_values(scales, ts)) if scales is not None else (torch.ones(len(ts)),) * 2
    first = len(ts) if x0 is None else round(strength * len(ts))
    if first == 0:
        return x0
    noise = mix(noise, int(ts[first - 1]))
    x = noise if x0 is None else a_t[first - 1].to(x0).sqrt() * x0 + (1 - a_t[first - 1].to(x0)).sqrt() * noise
    b, f = x.shape[0], x.shape[2]
    for i in reversed(range(first)):
        t = torch.full((b, f), int(ts[i]), device=x.device)
        eps = guided_eps(unet, x, t, cond, uncond, scale)
        z = mix(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), int(ts[i])) if eta > 0 else None
        correct = None if correct_x0 is None else (lambda x0, i=i: correct_x0(x0, i))
        x = ddim_step(x, eps, a_t[i].to(x), a_prev[i].to(x), eta, z, s_t[i].to(x), s_prev[i].to(x), clip_x0, correct)
    return x
