"""Fitting a picture to the video size: crop it to cover, pad it to fit, or stretch it.

torch is imported on first resize, so that the command line can read ``FIT_MODES`` cheaply.
"""

from __future__ import annotations

import math

import numpy as np

FIT_MODES = ("crop", "pad", "stretch")


def fit_frame(rgb: np.ndarray, width: int, height: int, mode: str = "crop") -> np.ndarray:
    """``rgb`` (uint8, shape (H, W, 3)) resized to a new uint8 array of shape (height, width, 3).

    ``crop`` scales the picture to cover the frame and keeps its center (what does not fit is
    cut off equally on both sides, the odd pixel from the right or bottom); ``pad`` scales it
    to fit inside and centers it on black (the odd bar pixel goes to the right or bottom);
    ``stretch`` resizes it to the frame ignoring its aspect ratio. Resampling is bilinear
    (``torch.nn.functional.interpolate``, antialiased when shrinking) in float32, rounded half
    to even and clamped to 0..255. A picture that needs no resampling is copied exactly, so a
    same-size input in ``crop`` or ``stretch`` (or ``pad``) returns an equal array.

    Raises ValueError for a mode not in ``FIT_MODES``, a size that is not positive, or an
    array that is not uint8 (H, W, 3).
    """
    array = np.asarray(rgb)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"expected a uint8 RGB picture of shape (H, W, 3), got {array.dtype} {array.shape}")
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode must be one of {', '.join(FIT_MODES)}, got {mode!r}")
    if int(width) != width or int(height) != height or width <= 0 or height <= 0:
        raise ValueError(f"the frame size must be positive whole numbers, got {width}x{height}")
    width, height = int(width), int(height)
    src_h, src_w = array.shape[:2]

    if mode == "stretch":
        return _resize(array, width, height)
    if mode == "crop":
        scale = max(width / src_w, height / src_h)
        crop_w = min(src_w, max(1, _round(width / scale)))
        crop_h = min(src_h, max(1, _round(height / scale)))
        left, top = (src_w - crop_w) // 2, (src_h - crop_h) // 2
        return _resize(array[top : top + crop_h, left : left + crop_w], width, height)
    scale = min(width / src_w, height / src_h)
    inner_w = min(width, max(1, _round(src_w * scale)))
    inner_h = min(height, max(1, _round(src_h * scale)))
    left, top = (width - inner_w) // 2, (height - inner_h) // 2
    out = np.zeros((height, width, 3), np.uint8)
    out[top : top + inner_h, left : left + inner_w] = _resize(array, inner_w, inner_h)
    return out


def _round(x: float) -> int:
    """Half up, so that sizes do not depend on Python's round-half-to-even."""
    return math.floor(x + 0.5)


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """A new (height, width, 3) uint8 array; an exact copy when the size already matches."""
    src_h, src_w = array.shape[:2]
    if (src_h, src_w) == (height, width):
        return np.array(array, dtype=np.uint8, order="C", copy=True)
    import torch
    import torch.nn.functional as F

    shrinking = height < src_h or width < src_w
    # astype copies into a writable, contiguous float32 array (the input may be a read-only view).
    image = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)
    return out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).contiguous().numpy()
