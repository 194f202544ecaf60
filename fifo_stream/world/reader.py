"""Reading a frame of the world back: the main object's color and shape, by pixel statistics."""

from __future__ import annotations

import numpy as np

from .scenes import COLORS


def classify_frame(frame: np.ndarray, threshold: float = 40.0) -> tuple[str | None, str | None]:
    """(color, shape) of the main object in a frame of this world, by pixel statistics.

    The background is each row's median color (backgrounds vary only vertically);
    pixels further than ``threshold`` from it are foreground. Each foreground pixel
    takes the nearest palette color; the most common color's largest 4-connected
    blob is the object. Its shape follows from how much of its bounding box it fills
    (square 1, circle pi/4, triangle 1/2). None where no object is found.
    """
    rgb = frame.astype(np.float32)
    background = np.median(rgb, axis=1, keepdims=True)
    foreground = np.abs(rgb - background).max(axis=2) > threshold
    if foreground.sum() < 12:
        return None, None
    palette = np.asarray(list(COLORS.values()), dtype=np.float32)
    nearest = np.linalg.norm(rgb[foreground][:, None] - palette[None], axis=2).argmin(axis=1)
    color_index = int(np.bincount(nearest, minlength=len(palette)).argmax())
    mask = np.zeros(foreground.shape, dtype=bool)
    mask[foreground] = nearest == color_index
    core = _largest_blob(_open3(mask))
    blob = mask & _grow3(core)  # the opening found the object; take back its thin tips
    if blob.sum() < 12:
        return list(COLORS)[color_index], None
    widths, heights = (np.trim_zeros(blob.sum(axis=axis)).astype(np.float64) for axis in (1, 0))
    full = max((widths >= 0.9 * widths.max()).mean(), (heights >= 0.9 * heights.max()).mean())
    rows = np.arange(len(widths))
    widening = np.corrcoef(rows, widths)[0, 1] if len(widths) > 2 and widths.std() > 0 else 0.0
    shape = "square" if full >= 0.75 else "triangle" if widening >= 0.7 else "circle"
    return list(COLORS)[color_index], shape


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
