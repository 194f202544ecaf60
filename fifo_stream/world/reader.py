"""Reading a frame of the world back: the main object's body color, shape and hat, by pixel statistics."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .scenes import BACKGROUNDS, COLORS, HAT_DEPTH


# Smallest hat, as a fraction of the body's pixels: a hat holds half the body's area; an encoder's
# blended edge on a hatless object stays under 0.045 (measured after libx264 at 64x64).
MIN_HAT = 0.055
# How far above the body a hat can reach, in body heights: the deepest hat's share of the height
# over the body's share.
HAT_REACH = max(d / (1 - d) for d in HAT_DEPTH.values())


class Reading(NamedTuple):
    """What a frame shows of its main object (None where it cannot be read)."""

    color: str | None  # the body color
    shape: str | None
    hat: str | None  # the hat's color


def classify_frame(frame: np.ndarray, threshold: float = 40.0) -> tuple[str | None, str | None]:
    """(color, shape) of the main object in a frame of this world: :func:`read_frame` without the hat."""
    return read_frame(frame, threshold)[:2]


def read_frame(frame: np.ndarray, threshold: float = 40.0) -> Reading:
    """Body color, shape and hat color of the main object in a frame of this world, by pixel statistics.

    The background is each row's median color (backgrounds vary only vertically);
    pixels further than ``threshold`` from it are foreground. Each foreground pixel
    takes the palette color it shows over that background (:func:`unmixed_color`); the most
    common color's largest 4-connected blob is the body. The hat is the most common other
    color in the band of rows just above the body, over the body's columns. The shape follows
    from how much of its bounding box body and hat fill (square 1, circle pi/4, triangle 1/2)
    and from whether it is much narrower at the top (a triangle).
    """
    rgb = frame.astype(np.float32)
    behind = np.broadcast_to(row_median(rgb), rgb.shape)
    foreground = _beyond(rgb, behind, threshold)
    if foreground.sum() < 12:
        return Reading(None, None, None)
    names = list(COLORS)
    palette = np.asarray(list(COLORS.values()), dtype=np.float32)
    nearest = np.full(foreground.shape, -1)
    nearest[foreground] = unmixed_color(rgb[foreground], behind[foreground], palette)
    color_index = int(np.bincount(nearest[foreground], minlength=len(palette)).argmax())
    body = _object_mask(nearest == color_index)
    if body.sum() < 12:
        return Reading(names[color_index], None, None)
    hat_index, hat = _hat(nearest, body, color_index)
    obj = foreground & _grow3(body | hat)  # with the blended pixels between body and hat
    widths, heights = (np.trim_zeros(obj.sum(axis=axis)).astype(np.float64) for axis in (1, 0))
    full = max((widths >= 0.9 * widths.max()).mean(), (heights >= 0.9 * heights.max()).mean())
    half = len(widths) // 2  # a triangle's top half is a third as wide as its bottom half; a circle's halves match
    tapers = widths[:half].sum() < 0.6 * widths[len(widths) - half :].sum()
    shape = "square" if full >= 0.75 else "triangle" if tapers else "circle"
    return Reading(names[color_index], shape, None if hat_index is None else names[hat_index])


def unmixed_color(pixels: np.ndarray, behind: np.ndarray, palette: np.ndarray, fit: float = 20.0) -> np.ndarray:
    """Index of the palette color each of ``pixels`` (n, 3) shows over its background ``behind`` (n, 3).

    An edge pixel blends the object's color c with the background b, and the nearest color alone
    misreads it: a red hat's rim on white is pink, nearer magenta than red. A pixel that such a blend
    a c + (1 - a) b (a in [0, 1]) explains within ``fit`` takes that c; any other (a blend of two
    object colors, a color of the model's own) takes the nearest palette color."""
    away = palette[None] - behind[:, None]  # (n, k, 3)
    share = np.clip(((pixels - behind)[:, None] * away).sum(-1) / np.maximum((away * away).sum(-1), 1e-6), 0, 1)
    blend_error = np.linalg.norm(pixels[:, None] - behind[:, None] - share[..., None] * away, axis=-1)
    nearest = np.linalg.norm(pixels[:, None] - palette[None], axis=-1).argmin(axis=1)
    blend = blend_error.argmin(axis=1)
    return np.where(blend_error.min(axis=1) < fit, blend, nearest)


def read_background(frame: np.ndarray) -> str:
    """The named background closest to the frame's top and bottom rows' median colors."""
    rgb = np.asarray(frame, dtype=np.float32)
    band = max(1, len(rgb) // 8)  # rows at the top and at the bottom
    seen = np.stack([np.median(rows.reshape(-1, 3), axis=0) for rows in (rgb[:band], rgb[-band:])])
    return min(BACKGROUNDS, key=lambda name: float(np.abs(seen - np.asarray(BACKGROUNDS[name], np.float32)).sum()))


def foreground_mask(frame: np.ndarray, threshold: float = 40.0) -> np.ndarray:
    """Pixels further than ``threshold`` from their row's median color (the background varies only vertically)."""
    rgb = np.asarray(frame, dtype=np.float32)  # no copy when the caller already converted
    return _beyond(rgb, row_median(rgb), threshold)


def _beyond(rgb: np.ndarray, behind: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels of ``rgb`` (H, W, 3) further than ``threshold`` from ``behind`` in some channel."""
    return np.abs(rgb - behind).max(axis=2) > threshold


def row_median(rgb: np.ndarray) -> np.ndarray:
    """(H, 1, 3): each row's median color, the background where it varies only vertically."""
    return np.median(rgb, axis=1, keepdims=True)


def centroid(frame: np.ndarray, threshold: float = 40.0) -> tuple[float, float] | None:
    """(x, y) of the foreground's center of mass, in pixels; None where the frame shows no object."""
    ys, xs = np.nonzero(foreground_mask(frame, threshold))
    return (float(xs.mean()), float(ys.mean())) if len(xs) >= 12 else None


def _object_mask(mask: np.ndarray) -> np.ndarray:
    """The largest blob of ``mask`` after an opening, with the thin tips the opening cut off."""
    return mask & _grow3(_largest_blob(_open3(mask)))


def _hat(nearest: np.ndarray, body: np.ndarray, body_index: int) -> tuple[int | None, np.ndarray]:
    """(palette index, mask) of the hat above ``body``; (None, empty) where there is none.

    The hat spans up to ``HAT_REACH`` body heights above the body's top row; a pixel or two of slack
    covers blurred edges.
    """
    rows, cols = np.nonzero(body)
    top, height = rows.min(), rows.max() - rows.min() + 1
    band = np.zeros(body.shape, dtype=bool)
    band[max(0, top - int(np.ceil(HAT_REACH * height)) - 1) : top + 2, cols.min() : cols.max() + 1] = True
    candidates = nearest[band & ~body & (nearest >= 0) & (nearest != body_index)]
    if candidates.size < 4:
        return None, np.zeros_like(body)
    index = int(np.bincount(candidates).argmax())
    hat = _object_mask(band & (nearest == index))
    if hat.sum() < max(4, MIN_HAT * body.sum()):
        return None, np.zeros_like(body)
    return index, hat


def _neighborhoods(mask: np.ndarray, fill: bool) -> np.ndarray:
    """The 9 shifted copies of ``mask`` covering each pixel's 3x3 neighborhood."""
    p = np.pad(mask, 1, constant_values=fill)
    h, w = mask.shape
    return np.stack([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])


def _grow3(mask: np.ndarray) -> np.ndarray:
    return _neighborhoods(mask, False).any(0)


def _open3(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 3x3 square: drops specks and slivers under 3 pixels wide."""
    return _grow3(_neighborhoods(mask, True).all(0))


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best
