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

With ``mode: template`` (:class:`TemplateAnchor`) the subject's cells themselves take the
reference object's, which band means cannot tell from a mixture of hat and body cells.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FifoStreamError


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
    (:meth:`take_reference`: the clip the queue starts from; :meth:`take_image`: the user's image,
    through the model's ``encode``).
    """

    def __init__(self, strength: float, min_level: int, bands: int, reference_tick: int | None, encode=None):
        self.strength, self.min_level, self.bands, self.reference_tick = float(strength), int(min_level), int(bands), reference_tick
        self.encode = encode
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

    def take_image(self, image: np.ndarray) -> None:
        """Take the reference from an image (H, W, 3) uint8 at the video size."""
        self.take_reference(self.encode(image[None])[:, :, 0])

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


def aligned_medoid(images: np.ndarray) -> int:
    """Index of the image in ``images`` (n, H, W, 3) whose subject differs least from the others',
    each pair compared with the subjects' centroids aligned (pixels under either subject)."""
    masks = [object_parts(img, 1) >= 0 for img in images]
    centroids = [np.argwhere(m).mean(0).round().astype(int) if m.any() else np.zeros(2, int) for m in masks]
    img = images.astype(np.float32)
    cost = np.zeros(len(images))
    for i in range(len(images)):
        for j in range(len(images)):
            if i != j:
                dy, dx = centroids[j] - centroids[i]
                moved, moved_mask = np.roll(img[i], (dy, dx), (0, 1)), np.roll(masks[i], (dy, dx), (0, 1))
                under = moved_mask | masks[j]
                cost[i] += np.linalg.norm(moved[under] - img[j][under], axis=-1).mean() if under.any() else 0.0
    return int(cost.argmin())


def row_background(z: torch.Tensor) -> torch.Tensor:
    """Background (n, c, h, 1) of latents ``z`` (n, c, h, w) per row: the mean of the row's densest
    cells (the cell whose w/4 nearest cells in the row lie closest, and those cells). Unlike the
    row median, it holds where the subject covers half a row."""
    n, c, h, w = z.shape
    m = max(1, w // 4)
    rows = z.permute(0, 2, 3, 1)  # (n, h, w, c)
    near = torch.cdist(rows, rows).topk(m + 1, dim=-1, largest=False)  # each cell's nearest in its row, itself included
    densest = near.values.sum(-1).argmin(-1)  # (n, h)
    members = near.indices.gather(2, densest[..., None, None].expand(-1, -1, 1, m + 1))[:, :, 0]  # (n, h, m + 1)
    mean = rows.gather(2, members[..., None].expand(-1, -1, -1, c)).mean(2)  # (n, h, c)
    return mean.permute(0, 2, 1)[..., None]


def object_parts(image: np.ndarray, parts: int, threshold: float = 0.4) -> np.ndarray:
    """Labels (H, W) of ``image`` (H, W, 3): -1 for background (pixels close to their row's median),
    else which of ``parts`` color clusters of the object (k-means from the median color and the pixels farthest from it)."""
    img = image.astype(np.float32)
    d = np.linalg.norm(img - np.median(img, axis=1, keepdims=True), axis=-1)
    mask = d > threshold * max(float(d.max()), 1e-6)
    labels = np.full(mask.shape, -1)
    if not mask.any():
        return labels
    colors = img[mask]
    centers = [np.median(colors, axis=0)]
    for _ in range(parts - 1):
        far = np.min([np.linalg.norm(colors - c, axis=1) for c in centers], axis=0)
        centers.append(colors[far.argmax()])
    centers = np.stack(centers)
    for _ in range(10):
        near = np.linalg.norm(colors[:, None] - centers[None], axis=-1).argmin(1)
        centers = np.stack([colors[near == k].mean(0) if (near == k).any() else centers[k] for k in range(parts)])
    labels[mask] = near
    return labels


class TemplateAnchor:
    """Keeps the reference subject cell by cell: each corrected frame's subject cells move toward the
    reference subject's latent cells, placed where the frame's subject is now.

    The reference object (pixels far from their row's median, split into ``parts`` color clusters:
    a hat and a body) is pasted onto its own background at every sub-cell offset and encoded, giving
    latent patches and the fraction of each patch cell that each part covers. A frame's subject is
    located by its layout, whatever its colors: the offset and cell position where the frame's cells
    are best explained as the background plus each part's coverage times a free color (least
    squares). The cells there that the object touches move by ``strength * (patch - cells)``, so hat and
    body keep their own colors and place, which band means mix. A touched cell's part not covered by the
    object shows the frame's background, not the reference's: the patch moves by that fraction of the
    difference of the two row backgrounds (exact for a linear codec), so a storyboard may change the background. ``encode``/``decode`` are the
    model's (uint8 frames at the video size <-> latents), ``factor`` its pixels per latent cell and
    ``step`` the offsets' spacing in pixels; the rest as :class:`SubjectAnchor`.
    """

    def __init__(self, strength: float, min_level: int, reference_tick: int | None, encode, decode, factor: int, step: int, parts: int = 2):
        self.strength, self.min_level, self.reference_tick = float(strength), int(min_level), reference_tick
        self.encode, self.decode, self.factor, self.step, self.parts = encode, decode, int(factor), int(step), int(parts)
        self.patches: torch.Tensor | None = None  # (O, c, ph, pw) latent patches, one per sub-cell offset
        self.part_coverage: torch.Tensor | None = None  # (O, parts, ph, pw) each part's fraction of each patch cell
        self.gram_inverse: torch.Tensor | None = None  # (O, parts, parts) inverse Gram matrices of the part coverages
        self.background: torch.Tensor | None = None  # (O, c, ph, 1) the reference's row backgrounds behind the patches

    def take_image(self, image: np.ndarray) -> None:
        """Build the patches from a reference ``image`` (H, W, 3) uint8 at the video size."""
        labels = object_parts(image, self.parts)
        if (labels < 0).all():
            raise FifoStreamError("consistency.anchor: the reference shows no subject (every pixel is like its row's); give a reference whose subject stands out from its background, or use mode=bands")
        (H, W), f = labels.shape, self.factor
        ys, xs = np.nonzero(labels >= 0)
        y0, x0, bh, bw = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        ph, pw = min(-(-bh // f) + 1, H // f), min(-(-bw // f) + 1, W // f)
        top, left = max(0, (H - ph * f) // 2 // f * f), max(0, (W - pw * f) // 2 // f * f)  # a cell-aligned home
        background = np.broadcast_to(np.median(image.astype(np.float32), axis=1, keepdims=True), image.shape).round().astype(np.uint8)
        frames, covers = [], []
        for oy in range(0, f, self.step):
            for ox in range(0, f, self.step):
                ty, tx = top + oy, left + ox
                hh, ww = min(bh, H - ty), min(bw, W - tx)
                placed = np.full((H, W), -1)
                placed[ty : ty + hh, tx : tx + ww] = labels[y0 : y0 + hh, x0 : x0 + ww]
                canvas = background.copy()
                canvas[placed >= 0] = image[y0 : y0 + hh, x0 : x0 + ww][placed[ty : ty + hh, tx : tx + ww] >= 0]
                frames.append(canvas)
                covers.append(np.stack([(placed == k).reshape(H // f, f, W // f, f).mean(axis=(1, 3)) for k in range(self.parts)]))
        latents = self.encode(np.stack(frames))[0].transpose(0, 1)  # (O, c, h, w)
        r, c = top // f, left // f
        self.load_state_dict({"patches": latents[:, :, r : r + ph, c : c + pw].float().cpu().clone(),
                              "part_coverage": torch.from_numpy(np.stack(covers)[..., r : r + ph, c : c + pw]).float(),
                              "background": row_background(latents.float())[:, :, r : r + ph].cpu().clone()})

    def observe(self, latent: torch.Tensor, tick: int) -> None:
        if self.patches is None and tick == self.reference_tick:
            self.take_image(self.decode(latent[:, :, None])[0, 0].numpy())

    def take_reference(self, z: torch.Tensor) -> None:
        """Build the patches from clean latent frames ``z`` (n, c, h, w), decoded: from the one whose subject
        looks most like the others' (:func:`aligned_medoid`), so one odd frame does not decide."""
        images = self.decode(z.transpose(0, 1)[None])[0].numpy()
        self.take_image(images[aligned_medoid(images)])

    def correct(self, x0: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        chosen = (levels.to(x0.device) >= self.min_level).nonzero().flatten()
        if self.patches is None or len(chosen) == 0:
            return x0
        z = x0[0, :, chosen].transpose(0, 1).float()  # (n, c, h, w)
        patches, parts = self.patches.to(z), self.part_coverage.to(z)
        (n, c, h, w), (O, k, ph, pw) = z.shape, parts.shape
        # Least squares per placement: cells - background ~ sum_j parts_j * color_j (colors free, per
        # channel); the explained energy r^T G^-1 r, G the parts' Gram matrix, ranks the placements.
        background = row_background(z)
        d = z - background
        r = F.conv2d(d.reshape(n * c, 1, h, w), parts.reshape(O * k, 1, ph, pw)).view(n, c, O, k, -1)
        explained = torch.einsum("ncoil,oij,ncojl->nol", r, self.gram_inverse.to(z), r)  # (n, O, L)
        sh, sw = h - ph + 1, w - pw + 1
        best = explained.flatten(1).argmax(1).tolist()
        covered = parts.sum(1, keepdim=True)  # (O, 1, ph, pw) the object's fraction of each patch cell
        touched = (covered > 0).to(z)  # the cells the object touches: the patch holds their mix with the background
        out = x0.clone()
        for i, index in enumerate(best):
            o, y, x = index // (sh * sw), index % (sh * sw) // sw, index % sw
            target = patches[o]
            if self.background is not None:
                target = target + (1 - covered[o]) * (background[i, :, y : y + ph] - self.background[o].to(z))
            region = z[i, :, y : y + ph, x : x + pw]
            z[i, :, y : y + ph, x : x + pw] = region + self.strength * touched[o] * (target - region)
        out[0, :, chosen] = z.transpose(0, 1).to(out.dtype)
        return out

    def state_dict(self) -> dict:
        return {k: None if v is None else v.clone() for k, v in
                (("patches", self.patches), ("part_coverage", self.part_coverage), ("background", self.background))}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint from before the background shift has none: its run goes on without the shift
        self.patches, self.part_coverage, self.background = state["patches"], state["part_coverage"], state.get("background")
        if self.part_coverage is not None:
            parts = self.part_coverage.double()
            gram = torch.einsum("oiyx,ojyx->oij", parts, parts) + 1e-6 * torch.eye(parts.shape[1], dtype=parts.dtype)
            self.gram_inverse = torch.linalg.inv(gram).float()
