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

In a storyboard each scene keeps the subject (the default: what the prompt leaves open holds
through the change) or renews it (``anchor: renew``, for a scene whose prompt names a new look):
a frame one window into the scene is then its reference (the first frames still show the change).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

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


def renews(scene: int, renew: Sequence[bool]) -> bool:
    """Whether storyboard ``scene`` renews the subject (``renew``: per scene)."""
    return scene < len(renew) and bool(renew[scene])


class SceneReferences:
    """What both anchors share: one reference per storyboard scene, made from the scene's emitted frame
    number ``settle`` (:meth:`observe`; the first frames of a scene still show the change, one window of
    frames later they do not), and which reference corrects which frames (:meth:`reference_of`)."""

    def __init__(self, strength: float, min_level: int, reference_tick: int | None, settle: int = 0):
        self.strength, self.min_level, self.reference_tick, self.settle = float(strength), int(min_level), reference_tick, int(settle)
        self.references: dict = {}  # scene -> its reference
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

    def reference_from(self, latent: torch.Tensor):
        """The reference an emitted latent (1, c, h, w) makes, or None."""
        raise NotImplementedError

    def keep_onto(self, previous, latent: torch.Tensor):
        """The reference of a scene that keeps ``previous`` (None: nothing to keep), made from the scene's frame
        ``latent``; None: its frames use ``previous`` itself."""
        return None

    def reference_of(self, scene: int, renew: Sequence[bool] = ()):
        """The reference that corrects ``scene``'s frames: its own, else an earlier scene's unless a scene
        since renews the subject (None: its frames are not corrected)."""
        for s in range(scene, -1, -1):
            if s in self.references:
                return self.references[s]
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
        return {"references": {s: self.reference_state(r) for s, r in self.references.items()}, "scene": self.scene, "scene_frames": self.scene_frames}

    def load_state_dict(self, state: dict) -> None:
        self.references = {int(s): self.reference_loaded(r) for s, r in state["references"].items()}
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


class ObjectCut(NamedTuple):
    """An image's object, to be composited onto other backgrounds (its bounding box)."""

    foreground: np.ndarray  # (h, w, 3) float32: each pixel less the background showing through it (0 outside the object)
    alpha: np.ndarray  # (h, w) float32: the object's share of each pixel (0 outside it)
    labels: np.ndarray  # (h, w) int64: :func:`object_parts`' labels (-1: background)

    def over(self, background: np.ndarray) -> np.ndarray:
        """The object over ``background`` (h, w, 3), float32."""
        return self.foreground + (1 - self.alpha[..., None]) * background


def find_object(image: np.ndarray, parts: int) -> ObjectCut | None:
    """The object in ``image`` (H, W, 3) uint8, or None where no pixel stands out from its row. Its
    edge pixels mix the object with the background: each pixel p of part k (median color c) over its
    row's median b has the share alpha = <p - b, c - b> / |c - b|^2 (clamped to [0, 1]), so the object
    goes onto another background without the old one's fringe."""
    labels = object_parts(image, parts)
    if (labels < 0).all():
        return None
    img = image.astype(np.float32)
    behind = np.broadcast_to(np.median(img, axis=1, keepdims=True), img.shape)
    alpha = np.zeros(labels.shape, np.float32)
    for k in range(parts):
        part = labels == k
        if part.any():
            away = np.median(img[part], axis=0) - behind[part]  # (n, 3): the part's color less the background
            norm = (away * away).sum(1)
            share = ((img[part] - behind[part]) * away).sum(1) / np.maximum(norm, 1e-6)
            alpha[part] = np.where(norm > 1.0, np.clip(share, 0, 1), 1.0)
    ys, xs = np.nonzero(labels >= 0)
    box = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
    foreground = (img - (1 - alpha[..., None]) * behind) * (labels >= 0)[..., None]
    return ObjectCut(foreground[box].copy(), alpha[box].copy(), labels[box].copy())


def row_median_background(image: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with every pixel its row's median: the background without the object."""
    return np.broadcast_to(np.median(image.astype(np.float32), axis=1, keepdims=True), image.shape).round().astype(np.uint8)


class Template:
    """One look of the subject on one background: the object pasted onto the background at every
    sub-cell offset and encoded. ``patches`` (O, c, ph, pw): the latent cells around the object;
    ``part_coverage`` (O, parts, ph, pw): each part's fraction of each patch cell; ``background``
    (O, c, ph, 1): the row backgrounds behind the patches."""

    def __init__(self, cut: ObjectCut | None, patches: torch.Tensor, part_coverage: torch.Tensor, background: torch.Tensor | None):
        self.cut = cut  # None in a checkpoint from before scene templates: no new backgrounds
        self.patches, self.part_coverage, self.background = patches, part_coverage, background
        parts = part_coverage.double()
        gram = torch.einsum("oiyx,ojyx->oij", parts, parts) + 1e-6 * torch.eye(parts.shape[1], dtype=parts.dtype)
        self.gram_inverse = torch.linalg.inv(gram).float()  # (O, parts, parts) for the least-squares placement
        self.covered = part_coverage.sum(1, keepdim=True)  # (O, 1, ph, pw) the object's fraction of each patch cell
        self.touched = (self.covered > 0).float()  # the cells the object touches: the patch holds their mix with the background

    @classmethod
    def build(cls, cut: ObjectCut, background: np.ndarray, encode, factor: int, step: int, parts: int) -> Template:
        """The object ``cut`` (``parts`` of them) over ``background`` (H, W, 3) uint8; ``encode``, ``factor``,
        ``step`` as :class:`TemplateAnchor`'s."""
        (H, W), (bh, bw), f = background.shape[:2], cut.labels.shape, factor
        ph, pw = min(-(-bh // f) + 1, H // f), min(-(-bw // f) + 1, W // f)
        top, left = max(0, (H - ph * f) // 2 // f * f), max(0, (W - pw * f) // 2 // f * f)  # a cell-aligned home
        frames, covers = [], []
        for oy in range(0, f, step):
            for ox in range(0, f, step):
                ty, tx = top + oy, left + ox
                hh, ww = min(bh, H - ty), min(bw, W - tx)
                placed = np.full((H, W), -1)
                placed[ty : ty + hh, tx : tx + ww] = cut.labels[:hh, :ww]
                canvas = background.astype(np.float32)
                canvas[ty : ty + hh, tx : tx + ww] = ObjectCut(*(v[:hh, :ww] for v in cut)).over(canvas[ty : ty + hh, tx : tx + ww])
                frames.append(canvas.round().clip(0, 255).astype(np.uint8))
                covers.append(np.stack([(placed == k).reshape(H // f, f, W // f, f).mean(axis=(1, 3)) for k in range(parts)]))
        latents = encode(np.stack(frames))[0].transpose(0, 1).float().cpu()  # (O, c, h, w)
        r, c = top // f, left // f
        return cls(cut, latents[:, :, r : r + ph, c : c + pw].clone(), torch.from_numpy(np.stack(covers)[..., r : r + ph, c : c + pw]).float(),
                   row_background(latents)[:, :, r : r + ph].clone())

    def state_dict(self) -> dict:
        cut = {} if self.cut is None else {k: torch.from_numpy(v) for k, v in self.cut._asdict().items()}
        return {**cut, "patches": self.patches.clone(), "part_coverage": self.part_coverage.clone(), "background": self.background}

    @classmethod
    def from_state(cls, state: dict) -> Template:
        cut = ObjectCut(*(state[k].numpy() for k in ObjectCut._fields)) if "labels" in state else None
        # a checkpoint from before the background shift has no background: its run goes on without the shift
        return cls(cut, state["patches"], state["part_coverage"], state.get("background"))


class TemplateAnchor(SceneReferences):
    """Keeps the reference subject cell by cell: each corrected frame's subject cells move toward the
    reference subject's latent cells, placed where the frame's subject is now.

    The reference object (pixels far from their row's median, split into ``parts`` color clusters:
    a hat and a body) makes a :class:`Template` on its own background. A frame's subject is located
    by its layout, whatever its colors: the offset and cell position where the frame's cells are best
    explained as the background plus each part's coverage times a free color (least squares). The
    cells there that the object touches move by ``strength * (patch - cells)``, so hat and body keep
    their own colors and place, which band means mix.

    Storyboards: each scene gets its own template from its frame number ``settle``: the object
    composited in pixels onto that frame's background (a scene that keeps the subject; see
    :func:`find_object`), or the object that frame shows (a scene that renews it). Until then a keeping scene's frames use the previous scene's
    template, the cells the object only partly covers moved by the uncovered fraction of the
    difference of the two row backgrounds (exact for a linear codec). ``encode``/``decode`` are the
    model's (uint8 frames at the video size <-> latents), ``factor`` its pixels per latent cell and
    ``step`` the offsets' spacing in pixels; the rest as :class:`SubjectAnchor`.
    """

    def __init__(self, strength: float, min_level: int, reference_tick: int | None, encode, decode, factor: int, step: int, parts: int = 2, settle: int = 0):
        super().__init__(strength, min_level, reference_tick, settle)
        self.encode, self.decode, self.factor, self.step, self.parts = encode, decode, int(factor), int(step), int(parts)

    def _template(self, cut: ObjectCut | None, image: np.ndarray) -> Template | None:
        """The template of the object ``cut`` on ``image``'s background."""
        if cut is None:
            return None
        return Template.build(cut, row_median_background(image), self.encode, self.factor, self.step, self.parts)

    def take_image(self, image: np.ndarray) -> None:
        """Take the reference object from the user's ``image`` (H, W, 3) uint8 at the video size: the first scene's template."""
        cut = find_object(image, self.parts)
        if cut is None:
            raise FifoStreamError("consistency.anchor: the reference shows no subject (every pixel is like its row's); give a reference whose subject stands out from its background, or use mode=bands")
        self.references = {0: self._template(cut, image)}

    def reference_from(self, latent: torch.Tensor) -> Template | None:
        image = self._image(latent)
        return self._template(find_object(image, self.parts), image)

    def keep_onto(self, previous: Template | None, latent: torch.Tensor) -> Template | None:
        if previous is None or previous.cut is None:  # nothing to keep, or a checkpoint without the object's pixels
            return None
        return self._template(previous.cut, self._image(latent))

    def _image(self, latent: torch.Tensor) -> np.ndarray:
        return self.decode(latent[:, :, None])[0, 0].numpy()

    def take_reference(self, z: torch.Tensor) -> None:
        """Take the reference from clean latent frames ``z`` (n, c, h, w), decoded: the one whose subject
        looks most like the others' (:func:`aligned_medoid`), so one odd frame does not decide. Frames
        without a subject give none (nothing is corrected until a scene renews the subject)."""
        images = self.decode(z.transpose(0, 1)[None])[0].numpy()
        image = images[aligned_medoid(images)]
        self.references = {}
        self._store(0, self._template(find_object(image, self.parts), image))

    def correct(self, x0: torch.Tensor, levels: torch.Tensor, scenes: torch.Tensor | None = None, renew: Sequence[bool] = ()) -> torch.Tensor:
        """``x0`` (1, c, F, h, w) of frames at ``levels`` (F,) of storyboard ``scenes`` (F,; None: the first),
        the chosen ones moved to their scene's template."""
        groups: dict[int, tuple[Template, list[int]]] = {}  # a storyboard's frames may have different templates
        for i, template in self.chosen(levels.to(x0.device), scenes, renew):
            groups.setdefault(id(template), (template, []))[1].append(i)
        if not groups:
            return x0
        out = x0.clone()
        for template, frames in groups.values():
            z = x0[0, :, frames].transpose(0, 1).float()  # (n, c, h, w)
            background = row_background(z)
            (ph, pw), touched = template.patches.shape[-2:], template.touched.to(z)
            for i, (o, y, x) in enumerate(self._place(z - background, template)):
                target = template.patches[o].to(z)
                if template.background is not None:
                    target = target + (1 - template.covered[o].to(z)) * (background[i, :, y : y + ph] - template.background[o].to(z))
                region = z[i, :, y : y + ph, x : x + pw]
                z[i, :, y : y + ph, x : x + pw] = region + self.strength * touched[o] * (target - region)
            out[0, :, frames] = z.transpose(0, 1).to(out.dtype)
        return out

    @staticmethod
    def _place(d: torch.Tensor, template: Template) -> list[tuple[int, int, int]]:
        """(offset, row, column) of the subject in each frame of ``d`` (n, c, h, w), frames less their row
        backgrounds: the least-squares fit cells ~ sum_j parts_j * color_j (colors free, per channel)
        whose explained energy r^T G^-1 r (G the parts' Gram matrix) is largest."""
        parts = template.part_coverage.to(d)
        (n, c, h, w), (O, k, ph, pw) = d.shape, parts.shape
        r = F.conv2d(d.reshape(n * c, 1, h, w), parts.reshape(O * k, 1, ph, pw)).view(n, c, O, k, -1)
        explained = torch.einsum("ncoil,oij,ncojl->nol", r, template.gram_inverse.to(d), r)  # (n, O, L)
        sh, sw = h - ph + 1, w - pw + 1
        return [(i // (sh * sw), i % (sh * sw) // sw, i % sw) for i in explained.flatten(1).argmax(1).tolist()]

    def reference_state(self, reference: Template) -> dict:
        return reference.state_dict()

    def reference_loaded(self, state: dict) -> Template:
        return Template.from_state(state)

    def load_state_dict(self, state: dict) -> None:
        if "references" not in state:  # a checkpoint from before storyboard scenes: one template, without the object's pixels
            state = {"references": {} if state["patches"] is None else {0: state}, "scene": 0, "scene_frames": 0}
        super().load_state_dict(state)
