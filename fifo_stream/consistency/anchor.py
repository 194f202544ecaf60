"""Subject appearance anchor: keep the colors of a reference frame's subject (training-free).

FIFO decides what the prompt leaves open (a body color) anew in every frame, at the high noise
levels, and the choices drift. The anchor acts on the sampler's prediction there: at the chosen
levels each frame's predicted clean latent x0 has its subject's per-channel means, in B
horizontal bands of the subject, moved to the reference frame's:

    x0 <- x0 + strength * sum_b M_b (mu_ref_b - mu_b)

M_b is the soft subject mask restricted to band b and mu_b the M_b-weighted channel mean. The
subject is what stands out from the frame's background: each latent cell's distance d to the
per-channel median of its row (so a vertical gradient is background too), as clamp(2 d / max(d) - 0.5, 0, 1) (as Ouroboros' subject-aware
attention restricts itself to the subject). Only the subject's colors are moved, not its place,
so the video keeps moving. The DDIM step then re-derives its noise estimate from the corrected
x0 (:func:`~fifo_stream.sampling.ddim.ddim_step`'s ``correct_x0``).
"""

from __future__ import annotations

import torch


def subject_mask(z: torch.Tensor) -> torch.Tensor:
    """Soft subject mask (N, 1, h, w) of latents ``z`` (N, c, h, w)."""
    background = z.median(-1, keepdim=True).values  # per row: a vertical gradient is background too
    d = (z - background).norm(dim=1, keepdim=True)
    top = d.flatten(1).max(1).values.clamp(min=1e-6)[:, None, None, None]
    return (2 * d / top - 0.5).clamp(0, 1)


def band_means(z: torch.Tensor, mask: torch.Tensor, bands: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(means (N, B, c), band masks (N, B, 1, h, w)): the subject split into ``bands`` horizontal
    bands of equal height between its top and bottom rows (rows holding > 5% of its peak row's mass)."""
    h = z.shape[-2]
    rows = mask.sum(dim=(1, 3))  # (N, h)
    y = torch.arange(h, device=z.device, dtype=z.dtype)
    present = rows > 0.05 * rows.max(1, keepdim=True).values
    top = torch.where(present, y, torch.full_like(y, h)).min(1).values
    bottom = torch.where(present, y, torch.full_like(y, -1)).max(1).values + 1
    means, masks = [], []
    for b in range(bands):
        lo, hi = (top + (bottom - top) * k / bands for k in (b, b + 1))
        inside = ((y >= lo[:, None]) & (y < hi[:, None])).to(z.dtype)[:, None, :, None]
        m = mask * inside
        means.append((z * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp(min=1e-6))
        masks.append(m)
    return torch.stack(means, 1), torch.stack(masks, 1)


class SubjectAnchor:
    """Records the reference subject colors and moves each corrected frame's toward them.

    ``min_level``: levels at or above this index are corrected (0: all); ``reference_tick``: the
    engine tick whose emitted latent is the reference, or None when the caller gives the reference
    frames (:meth:`take_reference`: the clip the queue starts from, or the user's image).
    """

    def __init__(self, strength: float, min_level: int, bands: int, reference_tick: int | None):
        self.strength, self.min_level, self.bands, self.reference_tick = float(strength), int(min_level), int(bands), reference_tick
        self.reference: torch.Tensor | None = None  # (1, B, c)

    def observe(self, latent: torch.Tensor, tick: int) -> None:
        """Take the emitted ``latent`` (1, c, h, w) of engine tick ``tick`` as the reference if it is the one."""
        if self.reference is None and tick == self.reference_tick:
            self.reference = band_means(latent, subject_mask(latent), self.bands)[0]

    def take_reference(self, z: torch.Tensor) -> None:
        """Take the reference from clean latent frames ``z`` (n, c, h, w): the band means of their medoid
        frame (the one closest to the others), so one odd frame does not decide the colors."""
        means = band_means(z, subject_mask(z), self.bands)[0]  # (n, B, c)
        flat = means.flatten(1)
        self.reference = means[torch.cdist(flat, flat).sum(1).argmin()][None].clone()

    def correct(self, x0: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """``x0`` (1, c, F, h, w) of frames at ``levels`` (F,), the chosen ones moved to the reference."""
        chosen = (levels.to(x0.device) >= self.min_level).nonzero().flatten()
        if self.reference is None or len(chosen) == 0:
            return x0
        z = x0[0, :, chosen].transpose(0, 1)  # (n, c, h, w)
        means, masks = band_means(z, subject_mask(z), self.bands)
        shift = (masks * (self.reference.to(z) - means)[..., None, None]).sum(1)
        out = x0.clone()
        out[0, :, chosen] = (z + self.strength * shift).transpose(0, 1)
        return out

    def state_dict(self) -> dict:
        return {"reference": None if self.reference is None else self.reference.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.reference = state["reference"]
