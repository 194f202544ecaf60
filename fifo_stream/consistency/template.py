"""Template anchor: the subject anchor's ``mode: template``, which keeps the reference subject cell by
cell (:class:`TemplateAnchor`), and what it is made of: the reference object cut from its image
(:func:`find_object`), composited onto a scene's background and encoded (:class:`Template`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FifoStreamError
from .anchor import SceneReferences, renews


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


def standing_out(img: np.ndarray) -> np.ndarray:
    """(H, W): how far each pixel of ``img`` (H, W, 3) float is from its row's median (the background)."""
    return np.linalg.norm(img - np.median(img, axis=1, keepdims=True), axis=-1)


def object_parts(image: np.ndarray, parts: int, threshold: float = 0.4) -> np.ndarray:
    """Labels (H, W) of ``image`` (H, W, 3): -1 for background (pixels standing out by at most ``threshold``
    of the most), else which of ``parts`` color clusters of the object (k-means from the median color and the pixels farthest from it)."""
    img = image.astype(np.float32)
    d = standing_out(img)
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


def with_rim(labels: np.ndarray, image: np.ndarray, rim: float = 0.1, width: int = 4) -> np.ndarray:
    """:func:`object_parts`' ``labels`` grown into the object's soft rim: pixels of ``image`` standing out
    by more than ``rim`` of the most, within ``width`` pixels of it, each taking its neighbour's part.
    Without the rim a template loses thin parts (a triangle's apex, a hat's corners) and the frames it
    corrects read as another shape."""
    d = standing_out(image.astype(np.float32))
    soft = d > rim * max(float(d.max()), 1e-6)
    H, W = labels.shape
    for _ in range(width):  # one pixel (4-neighbourhood) at a time
        padded, grown = np.pad(labels, 1, constant_values=-1), labels.copy()
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            neighbour = padded[dy : dy + H, dx : dx + W]
            take = (grown < 0) & soft & (neighbour >= 0)
            grown[take] = neighbour[take]
        labels = grown
    return labels


class ObjectCut(NamedTuple):
    """An image's object, to be composited onto other backgrounds (its bounding box)."""

    foreground: np.ndarray  # (h, w, 3) float32: each pixel less the background showing through it, in its part's one color (alpha x color; 0 outside the object)
    alpha: np.ndarray  # (h, w) float32: the object's share of each pixel (0 outside it)
    labels: np.ndarray  # (h, w) int64: :func:`object_parts`' labels (-1: background)

    def over(self, background: np.ndarray) -> np.ndarray:
        """The object over ``background`` (h, w, 3), float32."""
        return self.foreground + (1 - self.alpha[..., None]) * background

    def part_colors(self) -> np.ndarray:
        """(k, 3): the one color each of the object's k parts is cut in."""
        return np.stack([self.foreground[self.labels == k].sum(0) / max(float(self.alpha[self.labels == k].sum()), 1e-6)
                         for k in np.unique(self.labels[self.labels >= 0])])


def nearest_color(color: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """The color of ``palette`` (k, 3) nearest to ``color`` (3,) in RGB."""
    return palette[np.linalg.norm(palette - color, axis=1).argmin()]


def find_object(image: np.ndarray, parts: int, palette: np.ndarray | None = None) -> ObjectCut | None:
    """The object in ``image`` (H, W, 3) uint8, or None where no pixel stands out from its row. Its
    edge pixels mix the object with the background: each pixel p of part k (median color c) over its
    row's median b has the share alpha = <p - b, c - b> / |c - b|^2 (clamped to [0, 1]), so the object
    goes onto another background without the old one's fringe. Each part is cut in its one color c
    (foreground alpha * c): the template holds the part's color, not the reference frame's accidents
    (a hat drawn in two tones, which the frames then kept and a reader took for either). With a
    ``palette`` (k, 3) each part is cut in the palette color nearest to c instead."""
    core = object_parts(image, parts)
    if (core < 0).all():
        return None
    labels = with_rim(core, image)
    img = image.astype(np.float32)
    behind = np.broadcast_to(np.median(img, axis=1, keepdims=True), img.shape)
    alpha = np.zeros(labels.shape, np.float32)
    foreground = np.zeros_like(img)
    for k in range(parts):
        part = labels == k
        if part.any():
            color = np.median(img[core == k], axis=0)
            away = color - behind[part]  # (n, 3): the part's color less the background
            norm = (away * away).sum(1)
            share = ((img[part] - behind[part]) * away).sum(1) / np.maximum(norm, 1e-6)
            alpha[part] = np.where(norm > 1.0, np.clip(share, 0, 1), 1.0)
            foreground[part] = alpha[part][:, None] * (color if palette is None else nearest_color(color, palette))
    ys, xs = np.nonzero(labels >= 0)
    box = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
    return ObjectCut(foreground[box].copy(), alpha[box].copy(), labels[box].copy())


def row_median_background(image: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with every pixel its row's median: the background without the object."""
    return np.broadcast_to(np.median(image.astype(np.float32), axis=1, keepdims=True), image.shape).round().astype(np.uint8)


class Template:
    """One look of the subject on one background: the object pasted onto the background at every
    sub-cell offset and encoded. ``patches`` (O, c, ph, pw): the latent cells around the object;
    ``part_coverage`` (O, parts, ph, pw): each part's share of each patch cell (its pixels' alpha); ``background``
    (O, c, ph, 1): the row backgrounds behind the patches."""

    def __init__(self, cut: ObjectCut | None, patches: torch.Tensor, part_coverage: torch.Tensor, background: torch.Tensor | None):
        self.cut = cut  # None in a checkpoint from before scene templates: no new backgrounds
        self.patches, self.part_coverage, self.background = patches, part_coverage, background
        parts = part_coverage.double()
        gram = torch.einsum("oiyx,ojyx->oij", parts, parts) + 1e-6 * torch.eye(parts.shape[1], dtype=parts.dtype)
        self.gram_inverse = torch.linalg.inv(gram).float()  # (O, parts, parts) for the least-squares placement
        self.covered = part_coverage.sum(1, keepdim=True)  # (O, 1, ph, pw) the object's share of each patch cell (<= 1: parts are disjoint)
        smaller = part_coverage[torch.arange(len(part_coverage)), part_coverage.sum((2, 3)).argmin(1)][:, None]  # (O, 1, ph, pw) a hat's share
        # a hat is a part held in another color than the body's: an object cut in one color (its rim split off as a
        # second part, both held red) has none, and holding its rim whole pinned the outline
        has_hat = part_coverage.shape[1] > 1 and (cut is None or bool(np.ptp(cut.part_colors(), axis=0).max() >= 1))
        # where the smaller part has at least half the object's share
        self.smaller_part_cells = (smaller > 0) & (smaller >= 0.5 * self.covered) & has_hat

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
                placed, share = np.full((H, W), -1), np.zeros((H, W), np.float32)
                placed[ty : ty + hh, tx : tx + ww], share[ty : ty + hh, tx : tx + ww] = cut.labels[:hh, :ww], cut.alpha[:hh, :ww]
                canvas = background.astype(np.float32)
                canvas[ty : ty + hh, tx : tx + ww] = ObjectCut(*(v[:hh, :ww] for v in cut)).over(canvas[ty : ty + hh, tx : tx + ww])
                frames.append(canvas.round().clip(0, 255).astype(np.uint8))
                covers.append(np.stack([(share * (placed == k)).reshape(H // f, f, W // f, f).mean(axis=(1, 3)) for k in range(parts)]))
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
    cells there move by ``strength * w * (patch - cells)``, ``w = min(1, share / full_cover)`` and ``share``
    the object's part of the cell, so hat and body keep their own colors and place, which band means mix,
    and the rim is mostly the model's (``full_cover`` 1: each cell by its share; lower: cells the object
    covers at least that much are held whole; ``hold_smaller_part``: also every cell where the smaller part, a hat,
    has at least half of the object's share, however little of the cell it covers).

    Storyboards: each scene gets its own template from its frame number ``settle``: the object
    composited in pixels onto that frame's background (a scene that keeps the subject; see
    :func:`find_object`), or the object that frame shows (a scene that renews it). Until then a keeping scene's frames use an
    interim template, the object composited onto the background the scene's predicted frames show
    (:meth:`_make_interim`), each cell's uncovered fraction of the difference of the two row backgrounds added
    (exact for a linear codec); within its own scene a template's cells add ``1 - w`` of it, so cells
    held whole keep the template's background. ``encode``/``decode`` are the
    model's (uint8 frames at the video size <-> latents), ``factor`` its pixels per latent cell and
    ``step`` the offsets' spacing in pixels. With a ``palette`` (k, 3) of the colors the model draws, an
    object the model drew (not the user's image) is held in the nearest of them, part by part: a part
    drawn between two of them, held as drawn, lets the frames fall to either side. The rest as :class:`SubjectAnchor`.
    """

    def __init__(self, strength: float, min_level: int, reference_tick: int | None, encode, decode, factor: int, step: int,
                 parts: int = 2, settle: int = 0, palette: np.ndarray | None = None, full_cover: float = 1.0, hold_smaller_part: bool = False):
        super().__init__(strength, min_level, reference_tick, settle)
        self.encode, self.decode, self.factor, self.step, self.parts = encode, decode, int(factor), int(step), int(parts)
        self.palette, self.full_cover, self.hold_smaller_part = palette, float(full_cover), bool(hold_smaller_part)

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
        return self._template(find_object(image, self.parts, self.palette), image)

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
        self._store(0, self._template(find_object(image, self.parts, self.palette), image))

    def correct(self, x0: torch.Tensor, levels: torch.Tensor, scenes: torch.Tensor | None = None, renew: Sequence[bool] = ()) -> torch.Tensor:
        """``x0`` (1, c, F, h, w) of frames at ``levels`` (F,) of storyboard ``scenes`` (F,; None: the first),
        the chosen ones moved to their scene's template."""
        if scenes is not None:
            self._make_interim(x0, levels, scenes, renew)
        # a storyboard's frames may have different templates; a scene's frames before its own template
        # exists use an interim one or the previous scene's, made on another background ("foreign")
        groups: dict[tuple[int, bool], tuple[Template, list[int]]] = {}
        for i, template in self.chosen(levels.to(x0.device), scenes, renew):
            foreign = scenes is not None and self.references.get(int(scenes[i])) is not template
            groups.setdefault((id(template), foreign), (template, []))[1].append(i)
        if not groups:
            return x0
        out = x0.clone()
        for (_, foreign), (template, frames) in groups.items():
            z = x0[0, :, frames].transpose(0, 1).float()  # (n, c, h, w)
            background = row_background(z)
            ph, pw = template.patches.shape[-2:]
            moved = (template.covered.to(z) / self.full_cover).clamp(max=1)
            if self.hold_smaller_part:  # a hat's thin cells (a triangle's apex), which the model otherwise draws its own color into
                moved = torch.where(template.smaller_part_cells.to(z.device), torch.ones_like(moved), moved)
            # the background shift: on its own scene's frames a cell held whole keeps the template's background (the
            # two differ only by the frames' noise); on another background every cell's uncovered part takes the
            # frame's (exact for a linear codec: a held cell with the old background in it drew the body red on black)
            shifted = 1 - (template.covered.to(z) if foreign else moved)
            h, w = z.shape[-2:]
            for i, (o, y, x) in enumerate(self._place(z - background, template)):
                top, left, bottom, right = max(y, 0), max(x, 0), min(y + ph, h), min(x + pw, w)
                inside = (slice(None), slice(top - y, bottom - y), slice(left - x, right - x))  # the patch's cells in the frame
                target = template.patches[o][inside].to(z)
                if template.background is not None:
                    target = target + shifted[o][inside] * (background[i, :, top:bottom] - template.background[o][:, top - y : bottom - y].to(z))
                region = z[i, :, top:bottom, left:right]
                # a cell moves by the object's share of it: moving the rim (cells it partly covers) all the way
                # pinned the reference's outline, which mixed with the shape the prompt names (a triangle's apex,
                # a square's corners went round); the model draws the rim, the template holds the colors. What the
                # model draws in the rest of a mostly covered cell can still turn a small part to its own color
                # (a hat half out of the frame): full_cover < 1 holds such cells whole, the template's background
                # in them included (shifting it to the frame's row background turned seed 4's hat red again)
                z[i, :, top:bottom, left:right] = region + self.strength * moved[o][inside] * (target - region)
            out[0, :, frames] = z.transpose(0, 1).to(out.dtype)
        return out

    def _make_interim(self, x0: torch.Tensor, levels: torch.Tensor, scenes: torch.Tensor, renew: Sequence[bool]) -> None:
        """Give each keeping scene in ``x0`` without its own template an interim one: the kept object
        composited in pixels onto the background its least noisy predicted frames show (their row
        backgrounds, decoded). Made when the scene's first frame enters and again each time its level
        halves. The previous template shifted in latents onto a far background decodes in another hue
        (a blue body went cyan on black: this VAE's latent of a cell depends on its surroundings)."""
        for scene in scenes.unique().tolist():
            if scene == 0 or scene in self.references or renews(scene, renew):
                continue
            previous = self.reference_of(scene - 1, renew)
            if previous is None or previous.cut is None:  # nothing to keep, or a checkpoint without the object's pixels
                continue
            mine = (scenes == scene).nonzero().flatten()
            lead = int(levels[mine].min())
            made = self.interim.get(scene)
            if made is not None and not lead <= made[0] // 2 < made[0]:
                continue
            least_noisy = mine[levels[mine] == lead]
            background = row_background(x0[0, :, least_noisy].transpose(0, 1).float()).median(0, keepdim=True).values
            image = self._image(background.expand(-1, -1, -1, x0.shape[-1]).to(x0.dtype))
            self.interim[scene] = (lead, self._template(previous.cut, image))

    @staticmethod
    def _place(d: torch.Tensor, template: Template) -> list[tuple[int, int, int]]:
        """(offset, row, column) of the subject in each frame of ``d`` (n, c, h, w), frames less their row
        backgrounds: the least-squares fit cells ~ sum_j parts_j * color_j (colors free, per channel)
        whose explained energy r^T G^-1 r (G the parts' Gram matrix) is largest. The patch may hang one
        row or column past the frame's edge where the object does not cover it at that offset (the margin
        a patch keeps below and right of the object for the offsets): a subject by the bottom or right
        border is placed where it is, not a cell inward. Row and column are the patch's top left."""
        parts, margin = template.part_coverage.to(d), 1  # the frame is padded by the patch's margin on every side
        (n, c, h, w), (O, k, ph, pw) = d.shape, parts.shape
        pad = (margin,) * 4
        r = F.conv2d(F.pad(d, pad).reshape(n * c, 1, h + 2 * margin, w + 2 * margin), parts.reshape(O * k, 1, ph, pw)).view(n, c, O, k, -1)
        explained = torch.einsum("ncoil,oij,ncojl->nol", r, template.gram_inverse.to(d), r)  # (n, O, L)
        outside = F.conv2d(F.pad(d.new_zeros(1, 1, h, w), pad, value=1.0), template.covered.to(d)).view(1, O, -1)
        explained = explained.masked_fill(outside > 0, float("-inf"))  # no covered cell outside the frame
        sh, sw = h - ph + 1 + 2 * margin, w - pw + 1 + 2 * margin  # the patch positions in the padded frame
        return [(i // (sh * sw), i % (sh * sw) // sw - margin, i % sw - margin) for i in explained.flatten(1).argmax(1).tolist()]

    def reference_state(self, reference: Template) -> dict:
        return reference.state_dict()

    def reference_loaded(self, state: dict) -> Template:
        return Template.from_state(state)

    def load_state_dict(self, state: dict) -> None:
        if "references" not in state:  # a checkpoint from before storyboard scenes: one template, without the object's pixels
            state = {"references": {} if state["patches"] is None else {0: state}, "scene": 0, "scene_frames": 0}
        super().load_state_dict(state)
