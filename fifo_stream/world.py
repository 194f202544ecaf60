"""A procedural video world: colored shapes moving and bouncing over simple backgrounds.

Every clip is a pure function of its seed, so the world is an unlimited, exactly
reproducible dataset (the embedded model is trained on it) and a ground truth for
measuring consistency (``tools/eval_consistency.py``). Captions follow a small grammar:
``"a red circle moves left on a black background"``, or for two objects
``"a red circle and a blue square move on a gray background"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (230, 40, 40),
    "yellow": (235, 215, 40),
    "green": (40, 190, 60),
    "cyan": (40, 210, 225),
    "blue": (50, 80, 235),
    "magenta": (215, 50, 210),
}
BACKGROUNDS = {  # top and bottom color of a vertical gradient
    "black": ((15, 15, 15), (15, 15, 15)),
    "gray": ((120, 120, 120), (120, 120, 120)),
    "white": ((240, 240, 240), (240, 240, 240)),
    "gradient": ((30, 30, 90), (130, 130, 170)),
}
DIRECTIONS = ("left", "right", "up", "down")
VOCAB = ("a", "and", "moves", "move", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS, *DIRECTIONS)


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    radius: float  # half the side of the bounding box, in pixels
    position: tuple[float, float]  # center (x, y) in frame 0
    velocity: tuple[float, float]  # pixels per frame

    @property
    def direction(self) -> str:
        vx, vy = self.velocity
        if abs(vx) >= abs(vy):
            return "left" if vx < 0 else "right"
        return "up" if vy < 0 else "down"


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: str

    @property
    def caption(self) -> str:
        return caption(self.objects, self.background)


def caption(objects, background: str) -> str:
    if len(objects) == 1:
        o = objects[0]
        return f"a {o.color} {o.shape} moves {o.direction} on a {background} background"
    names = " and ".join(f"a {o.color} {o.shape}" for o in objects)
    return f"{names} move on a {background} background"


def parse_caption(text: str) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """(color, shape) pairs, background and direction named in a caption (None where absent)."""
    words = re.findall(r"[a-z]+", text.lower())
    pairs = [(a, b) for a, b in zip(words, words[1:]) if a in COLORS and b in SHAPES]
    background = next((w for w, nxt in zip(words, words[1:]) if w in BACKGROUNDS and nxt == "background"), None)
    direction = next((w for w in words if w in DIRECTIONS), None)
    return pairs, background, direction


def scene_from_caption(text: str, size: int, seed: int) -> Scene:
    """A random scene that matches ``text`` (its objects, background and direction)."""
    pairs, background, direction = parse_caption(text)
    if not pairs:
        raise ValueError(f"caption {text!r} names no '<color> <shape>'; colors: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}")
    rng = np.random.default_rng(seed)
    bg = background or str(rng.choice(list(BACKGROUNDS)))
    objects = tuple(_random_object(rng, size, color, shape, direction if len(pairs) == 1 else None) for color, shape in pairs)
    return Scene(objects, bg)


def random_scene(size: int, seed: int, two_objects: float = 0.25) -> Scene:
    """A random scene: one object, or two with probability ``two_objects``."""
    rng = np.random.default_rng(seed)
    count = 2 if rng.random() < two_objects else 1
    colors = rng.choice(list(COLORS), size=count, replace=False)
    objects = tuple(_random_object(rng, size, str(c), str(rng.choice(SHAPES)), None) for c in colors)
    return Scene(objects, str(rng.choice(list(BACKGROUNDS))))


def _random_object(rng: np.random.Generator, size: int, color: str, shape: str, direction: str | None) -> WorldObject:
    # 34-44% of the frame across: large enough for a shape to span several cells of a small
    # model's 4x-downsampled latents, small enough that every row stays mostly background
    # (classify_frame takes each row's median as the background).
    radius = rng.uniform(0.17, 0.22) * size
    position = tuple(rng.uniform(radius, size - radius, 2))
    speed = rng.uniform(0.015, 0.045) * size
    if direction is None:
        angle = rng.uniform(0, 2 * np.pi)
    else:  # within 40 degrees of the named direction, so the caption's word stays the dominant one
        angle = {"right": 0.0, "down": np.pi / 2, "left": np.pi, "up": 3 * np.pi / 2}[direction] + rng.uniform(-0.7, 0.7)
    return WorldObject(shape, color, float(radius), (float(position[0]), float(position[1])), (float(speed * np.cos(angle)), float(speed * np.sin(angle))))


def positions(obj: WorldObject, size: int, frames: int, start: int = 0) -> np.ndarray:
    """Centers (frames, 2) of ``obj`` from frame ``start``, bouncing off the borders."""
    t = np.arange(start, start + frames)[:, None]
    low, span = obj.radius, size - 2 * obj.radius
    raw = np.asarray(obj.position) - low + t * np.asarray(obj.velocity)
    folded = np.mod(raw, 2 * span)  # reflect: a triangle wave of period 2 * span
    return low + np.where(folded > span, 2 * span - folded, folded)


def background_image(name: str, size: int) -> np.ndarray:
    top, bottom = (np.asarray(c, dtype=np.float32) for c in BACKGROUNDS[name])
    w = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    return np.broadcast_to((1 - w) * top + w * bottom, (size, size, 3)).round().astype(np.uint8)


def shape_mask(shape: str, center: np.ndarray, radius: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape, sampled at pixel centers."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - center[0], y - center[1]
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":  # apex up, base at the bottom of the bounding box
        return (np.abs(dy) <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def render(scene: Scene, size: int, frames: int, start: int = 0) -> np.ndarray:
    """Frames ``start .. start + frames - 1`` of ``scene``: uint8 (frames, size, size, 3)."""
    background = background_image(scene.background, size)
    video = np.repeat(background[None], frames, axis=0)
    for obj in scene.objects:
        color = np.asarray(COLORS[obj.color], dtype=np.uint8)
        for i, center in enumerate(positions(obj, size, frames, start)):
            video[i][shape_mask(obj.shape, center, obj.radius, size)] = color
    return video


def sample_clip(seed: int, size: int, frames: int) -> tuple[np.ndarray, str]:
    """A training example: the first ``frames`` frames of a random scene, and its caption."""
    scene = random_scene(size, seed)
    return render(scene, size, frames), scene.caption


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
