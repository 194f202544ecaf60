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

With ``mode: template`` (:class:`~fifo_stream.consistency.template.TemplateAnchor`) the subject's
cells themselves take the reference object's, which band means cannot tell from a mixture of hat
and body cells.

In a storyboard each scene keeps the subject (the default: what the prompt leaves open holds
through the change) or renews it (``anchor: renew``, for a scene whose prompt names a new look):
a frame one window into the scene is then its reference (the first frames still show the change).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
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


def renews(scene: int, renew: Sequence[bool]) -> bool:
    """Whether storyboard ``scene`` renews the subject (``renew``: per scene)."""
    return scene < len(renew) and bool(renew[scene])


class SceneReferences:
    """What both anchors share: one reference per storyboard scene, made from the scene's emitted frame
    number ``settle`` (:meth:`observe`; the first frames of a scene still show the change, one window of
    frames later they do not), and which reference corrects which frames (:meth:`reference_of`). An
    anchor may hold an interim reference for a scene until then, made from the scene's predicted frames."""

    def __init__(self, strength: float, min_level: int, reference_tick: int | None, settle: int = 0):
        self.strength, self.min_level, self.reference_tick, self.settle = float(strength), int(min_level), reference_tick, int(settle)
        self.references: dict = {}  # scene -> its reference
        self.interim: dict = {}  # scene -> (level, reference): made from its predicted frames at that noise level, until its own
        self.scene, self.scene_frames = 0, 0  # the latest scene a frame was emitted of, and how many of its frames were

    def observe(self, latent: torch.Tensor, tick: int, scene: int = 0, renew: Sequence[bool] = ()) -> None:
        """Take the emitted ``latent`` (1, c, h, w) of engine tick ``tick``, of storyboard ``scene``
        (``renew``: per scene, whether it renews the subject), where it makes a reference."""
        if scene > self.scene:
            self.scene, self.scene_frames = scene, 0
        self.scene_frames += 1
        if not self.references and tick == self.reference_tick:
            self._store(scene, self.reference_from(latent))
        elif scene > 0 and self.scene_frames == self.settle + 1:
            previous = self.reference_of(scene - 1, renew)
            self._store(scene, self.reference_from(latent) if renews(scene, renew) else self.keep_onto(previous, latent))

    def _store(self, scene: int, reference) -> None:
        if reference is not None:  # a frame without a subject makes none
            self.references[scene] = reference
            self.interim.pop(scene, None)

    def reference_from(self, latent: torch.Tensor):
        """The reference an emitted latent (1, c, h, w) makes, or None."""
        raise NotImplementedError

    def keep_onto(self, previous, latent: torch.Tensor):
        """The reference of a scene that keeps ``previous`` (None: nothing to keep), made from the scene's frame
        ``latent``; None: its frames use ``previous`` itself."""
        return None

    def reference_of(self, scene: int, renew: Sequence[bool] = ()):
        """The reference that corrects ``scene``'s frames: its own (or its interim one), else an earlier
        scene's unless a scene since renews the subject (None: its frames are not corrected)."""
        for s in range(scene, -1, -1):
            if s in self.references:
                return self.references[s]
            if s in self.interim:
                return self.interim[s][1]
            if renews(s, renew):
                return None
        return None

    def chosen(self, levels: torch.Tensor, scenes: torch.Tensor | None, renew: Sequence[bool]) -> list[tuple[int, object]]:
        """(frame, reference) of the frames at ``levels`` (F,) of ``scenes`` (F,; None: the first) that are corrected."""
        out = []
        for i in (levels >= self.min_level).nonzero().flatten().tolist():
            reference = self.reference_of(0 if scenes is None else int(scenes[i]), renew)
            if reference is not None:
                out.append((i, reference))
        return out

    def state_dict(self) -> dict:
        return {"references": {s: self.reference_state(r) for s, r in self.references.items()}, "scene": self.scene, "scene_frames": self.scene_frames,
                "interim": {s: {"level": level, "reference": self.reference_state(r)} for s, (level, r) in self.interim.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.references = {int(s): self.reference_loaded(r) for s, r in state["references"].items()}
        self.interim = {int(s): (int(v["level"]), self.reference_loaded(v["reference"])) for s, v in state.get("interim", {}).items()}  # none before interim references
        self.scene, self.scene_frames = int(state["scene"]), int(state["scene_frames"])

    def reference_state(self, reference):
        return reference.cpu().clone()

    def reference_loaded(self, state):
        return state


class SubjectAnchor(SceneReferences):
    """Records the reference subject colors and moves each corrected frame's toward them.

    ``min_level``: levels at or above this index are corrected (0: all); ``reference_tick``: the
    engine tick whose emitted latent is the reference, or None when the caller gives the reference
    (:meth:`take_reference`: the clip the queue starts from; :meth:`take_image`: the user's image,
    through the model's ``encode``). A storyboard scene that renews the subject takes the colors
    of its frame number ``settle`` (its frames are not corrected before); the others keep the colors.
    """

    def __init__(self, strength: float, min_level: int, bands: int, reference_tick: int | None, encode=None, settle: int = 0):
        super().__init__(strength, min_level, reference_tick, settle)
        self.bands, self.encode = int(bands), encode

    def reference_from(self, latent: torch.Tensor) -> torch.Tensor:
        return band_means(latent, subject_mask(latent), self.bands)[0]  # (1, B, c)

    def take_reference(self, z: torch.Tensor) -> None:
        """Take the reference from clean latent frames ``z`` (n, c, h, w): the band means of their medoid
        frame (the one closest to the others), so one odd frame does not decide the colors."""
        means = band_means(z, subject_mask(z), self.bands)[0]  # (n, B, c)
        flat = means.flatten(1)
        self.references = {0: means[torch.cdist(flat, flat).sum(1).argmin()][None].clone()}

    def take_image(self, image: np.ndarray) -> None:
        """Take the reference from an image (H, W, 3) uint8 at the video size."""
        self.take_reference(self.encode(image[None])[:, :, 0])

    def correct(self, x0: torch.Tensor, levels: torch.Tensor, scenes: torch.Tensor | None = None, renew: Sequence[bool] = ()) -> torch.Tensor:
        """``x0`` (1, c, F, h, w) of frames at ``levels`` (F,) of storyboard ``scenes`` (F,; None: the first),
        the chosen ones moved to their scene's reference."""
        chosen = self.chosen(levels, scenes, renew)
        if not chosen:
            return x0
        frames = [i for i, _ in chosen]
        z = x0[0, :, frames].transpose(0, 1)  # (n, c, h, w)
        means, masks = band_means(z, subject_mask(z), self.bands)
        shift = (masks * (torch.cat([r for _, r in chosen]).to(z) - means)[..., None, None]).sum(1)
        out = x0.clone()
        out[0, :, frames] = (z + self.strength * shift).transpose(0, 1)
        return out

    def load_state_dict(self, state: dict) -> None:
        if "references" not in state:  # a checkpoint from before storyboard scenes: one reference
            state = {"references": {} if state["reference"] is None else {0: state["reference"]}, "scene": 0, "scene_frames": 0}
        super().load_state_dict(state)
