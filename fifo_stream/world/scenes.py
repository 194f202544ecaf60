"""The world's scenes: the palette, the caption grammar, random and captioned scenes, and rendering.

With ``open_identity`` (world v2) every object wears a hat: its top part, holding a third of its
area, drawn in a second palette color, never its body color, that no caption names; and a third of
the captions leave the body color out. Both stay fixed for a clip, so they are identity the
prompt leaves open: what a long video must keep without being told (the Santa test,
tools/santa.py). Without it (world v1, what the shipped model was trained on) scenes are those
of earlier versions, seed for seed.
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
OPEN_COLOR = 1 / 3  # fraction of captioned objects whose body color the caption leaves out
# The hat's share of the object's height, from the top: the depth that holds a third of the shape's
# area (a circle's segment; (1/3) ** 0.5 of a triangle, whose apex holds little), so every shape's hat
# covers several latent cells of a small model.
HAT_DEPTH = {"circle": 0.3675, "square": 1 / 3, "triangle": 3**-0.5}
VOCAB = ("a", "and", "moves", "move", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS, *DIRECTIONS)


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    radius: float  # half the side of the bounding box, in pixels
    position: tuple[float, float]  # center (x, y) in frame 0
    velocity: tuple[float, float]  # pixels per frame
    hat: str | None = None  # the hat's color (world v2): never the body color, never named by a caption
    color_named: bool = True  # whether the caption names the body color

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
    names = [f"a {o.color} {o.shape}" if o.color_named else f"a {o.shape}" for o in objects]
    if len(objects) == 1:
        return f"{names[0]} moves {objects[0].direction} on a {background} background"
    return f"{' and '.join(names)} move on a {background} background"


def parse_caption(text: str) -> tuple[list[tuple[str | None, str]], str | None, str | None]:
    """(color, shape) pairs, background and direction named in a caption (None where absent).

    A shape without a color before it gives the pair (None, shape): the body color is left open.
    """
    words = re.findall(r"[a-z]+", text.lower())
    pairs = [(before if before in COLORS else None, w) for before, w in zip(["", *words], words) if w in SHAPES]
    background = next((w for w, nxt in zip(words, words[1:]) if w in BACKGROUNDS and nxt == "background"), None)
    direction = next((w for w in words if w in DIRECTIONS), None)
    return pairs, background, direction


def scene_from_caption(text: str, size: int, seed: int, open_identity: bool = False) -> Scene:
    """A random scene that matches ``text`` (its objects, background and direction); a color the
    caption leaves out is random; with ``open_identity`` the objects wear hats."""
    pairs, background, direction = parse_caption(text)
    if not pairs:
        raise ValueError(f"caption {text!r} names no '[color] <shape>'; colors: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}")
    rng = np.random.default_rng(seed)
    bg = background or str(rng.choice(list(BACKGROUNDS)))
    named = [c for c, _ in pairs if c]
    open_colors = iter(rng.permutation([c for c in COLORS if c not in named]) if len(named) < len(pairs) else ())
    objects = tuple(
        _random_object(rng, size, color or str(next(open_colors)), shape, direction if len(pairs) == 1 else None, color is not None, open_identity)
        for color, shape in pairs
    )
    return Scene(objects, bg)


def random_scene(size: int, seed: int, two_objects: float = 0.25, open_identity: bool = False) -> Scene:
    """A random scene: one object, or two with probability ``two_objects``; world v2 with ``open_identity``."""
    rng = np.random.default_rng(seed)
    count = 2 if rng.random() < two_objects else 1
    colors = rng.choice(list(COLORS), size=count, replace=False)
    objects = tuple(
        _random_object(rng, size, str(c), str(rng.choice(SHAPES)), None, not open_identity or rng.random() >= OPEN_COLOR, open_identity)
        for c in colors
    )
    return Scene(objects, str(rng.choice(list(BACKGROUNDS))))


def _random_object(rng: np.random.Generator, size: int, color: str, shape: str, direction: str | None, color_named: bool,
                   hat: bool) -> WorldObject:
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
    velocity = (float(speed * np.cos(angle)), float(speed * np.sin(angle)))
    hat_color = str(rng.choice([c for c in COLORS if c != color])) if hat else None
    return WorldObject(shape, color, float(radius), (float(position[0]), float(position[1])), velocity, hat_color, color_named)


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


def _pixel_centers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates of the pixel centers of a (size, size) frame."""
    return tuple(np.mgrid[0:size, 0:size].astype(np.float32) + 0.5)


def shape_mask(shape: str, center: np.ndarray, radius: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape, sampled at pixel centers."""
    y, x = _pixel_centers(size)
    dx, dy = x - center[0], y - center[1]
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":  # apex up, base at the bottom of the bounding box
        return (np.abs(dy) <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def _drawn(scene: Scene, size: int, frames: int, start: int):
    """(frame index, object, center, its shape's mask) of every object in every frame, in drawing order."""
    for obj in scene.objects:
        for i, center in enumerate(positions(obj, size, frames, start)):
            yield i, obj, center, shape_mask(obj.shape, center, obj.radius, size)


def render(scene: Scene, size: int, frames: int, start: int = 0) -> np.ndarray:
    """Frames ``start .. start + frames - 1`` of ``scene``: uint8 (frames, size, size, 3)."""
    background = background_image(scene.background, size)
    video = np.repeat(background[None], frames, axis=0)
    for i, obj, center, mask in _drawn(scene, size, frames, start):
        video[i][mask] = COLORS[obj.color]
        if obj.hat is not None:
            video[i][_hat_part(obj, center, mask)] = COLORS[obj.hat]
    return video


def _hat_part(obj: WorldObject, center: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The part of an object's ``mask`` that its hat covers."""
    y, _ = _pixel_centers(mask.shape[0])
    return mask & (y < center[1] - obj.radius + 2 * HAT_DEPTH[obj.shape] * obj.radius)


def object_mask(scene: Scene, size: int, frames: int, start: int = 0, hats: bool = False) -> np.ndarray:
    """Where ``render`` draws an object (hat included) in frames ``start ..``, or with ``hats`` only
    where it draws a hat: bool (frames, size, size)."""
    masks = np.zeros((frames, size, size), dtype=bool)
    for i, obj, center, mask in _drawn(scene, size, frames, start):
        if not hats:
            masks[i] |= mask
            continue
        masks[i] &= ~mask  # an object drawn later covers the hats under it
        if obj.hat is not None:
            masks[i] |= _hat_part(obj, center, mask)
    return masks
