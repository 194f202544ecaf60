"""Storyboard prompts: which prompt conditions each emitted frame, with linear transitions.

A storyboard is a list of scenes (first frame, prompt, optional transition); frame numbers
are emitted frame numbers, 0 being the first frame of the output. With a transition of L
frames (the scene's own, else the storyboard's), frame e of scene j (which starts at N_j) has
the context (1 - w) c_(j-1) + w c_j with w = min(1, (e - N_j + 1) / (L + 1)): the L frames
N_j .. N_j + L - 1 blend, N_j + L is pure. The FIFO queue gives every slot the context of the
frame it becomes, so a scene appended while a run goes on (:meth:`Storyboard.add`, a live
prompt) changes nothing before its frame.

A scene keeps the subject anchor's reference (``anchor: keep``, the default: what the prompts
leave open holds) or renews it (``anchor: renew``: a scene whose prompt names a new look).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch

from ..errors import FifoStreamError

_NUMBERED = re.compile(r"\s*([+-]?\d+)\s*:(.*)", re.DOTALL)


class StoryboardError(FifoStreamError):
    pass


ANCHOR_POLICIES = ("keep", "renew")


class Scene(NamedTuple):
    frame: int  # first emitted frame
    prompt: str
    transition: int | None = None  # frames blending in from the previous scene (None: the storyboard's)
    anchor: str = "keep"  # keep: the subject anchor holds the reference through this scene | renew: this scene's own subject is the reference


class SlotScenes(NamedTuple):
    """The storyboard scene of each FIFO queue slot's frame, for the subject anchor."""

    index: torch.Tensor  # (L,) scene of each slot
    renew: tuple[bool, ...]  # per scene: whether it renews the anchor's reference


def _transition_ok(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _scene(entry, first: bool) -> tuple[int | None, str, int | None, str]:
    """(frame or None, prompt, transition or None, anchor) of one entry: 'text', 'N: text' or
    {frame: N, prompt: text[, transition: L][, anchor: keep|renew]}."""
    anchor = "keep"
    if isinstance(entry, Mapping):
        if (not {"frame", "prompt"} <= set(entry) <= {"frame", "prompt", "transition", "anchor"} or not isinstance(entry["frame"], int)
                or not isinstance(entry["prompt"], str) or not _transition_ok(entry.get("transition"))
                or entry.get("anchor", "keep") not in ANCHOR_POLICIES):
            raise StoryboardError(f"storyboard entry {dict(entry)!r} must be 'N: text' or {{frame: N, prompt: text[, transition: L >= 0][, anchor: keep|renew]}}")
        frame, text, transition, anchor = entry["frame"], entry["prompt"], entry.get("transition"), entry.get("anchor", "keep")
    elif isinstance(entry, str):
        match = _NUMBERED.fullmatch(entry)
        (frame, text), transition = ((int(match[1]), match[2]) if match else (None, entry)), None
        if frame is None and not first:
            raise StoryboardError(f"prompt {entry!r} needs the frame it starts at: write 'N: {entry.strip()}' (only the first prompt may leave it out)")
    else:
        raise StoryboardError(f"storyboard entry {entry!r} must be 'N: text' or {{frame: N, prompt: text}} (quote 'N: text' in YAML)")
    if not text.strip():
        raise StoryboardError(f"storyboard entry {entry!r} has no prompt text")
    if frame is not None and frame < 0:
        raise StoryboardError(f"storyboard entry {entry!r}: frame numbers must be >= 0")
    return frame, text.strip(), transition, anchor


@dataclass(frozen=True)
class Storyboard:
    scenes: tuple[Scene, ...]  # starts at frame 0, strictly increasing
    transition: int = 0  # the scenes' transition unless they give their own

    @classmethod
    def parse(cls, entries: Sequence[str | Mapping], transition: int = 0) -> Storyboard:
        """Scenes from entries 'text' (the first only), 'N: text' or {frame: N, prompt: text[, transition: L][, anchor: keep|renew]}."""
        if not entries:
            raise StoryboardError("no prompt given: pass PROMPT, --prompt 'text' or storyboard.prompts")
        scenes = []
        for i, entry in enumerate(entries):
            frame, text, own, anchor = _scene(entry, first=i == 0)
            frame = 0 if frame is None else frame
            if i == 0 and frame != 0:
                raise StoryboardError(
                    f"the first prompt must start at frame 0, not {frame}: leave out its number "
                    f"(or write '0: {str(entry).strip()}' if the number is part of the prompt)"
                )
            if scenes and frame <= scenes[-1][0]:
                raise StoryboardError(f"storyboard frame numbers must increase: {frame} follows {scenes[-1][0]}")
            length = transition if own is None else own
            if scenes and frame - scenes[-1][0] < length:
                raise StoryboardError(
                    f"prompts at frames {scenes[-1][0]} and {frame} are closer than the {length}-frame transition; "
                    "space them further apart or shorten the transition"
                )
            scenes.append(Scene(frame, text, own, anchor))
        return cls(tuple(scenes), int(transition))

    def add(self, frame: int, prompt: str, transition: int | None = None, anchor: str = "keep") -> Storyboard:
        """This storyboard with a scene appended (checked as :meth:`parse` checks every scene)."""
        return Storyboard.parse([*self.to_json(), {"frame": frame, "prompt": prompt, "transition": transition, "anchor": anchor}], self.transition)

    @property
    def prompts(self) -> list[str]:
        """The distinct prompts, in order of first use."""
        return list(dict.fromkeys(s.prompt for s in self.scenes))

    def to_json(self) -> list[dict]:
        return [{"frame": s.frame, "prompt": s.prompt, **({} if s.transition is None else {"transition": s.transition}),
                 **({} if s.anchor == "keep" else {"anchor": s.anchor})} for s in self.scenes]

    def describe(self) -> list[str]:
        return [f"{s.frame}: {s.prompt}" + ("" if s.transition is None else f" (transition {s.transition})")
                + ("" if s.anchor == "keep" else f" (anchor {s.anchor})") for s in self.scenes]

    def prompt_at(self, frame: int) -> str:
        """The prompt of the scene emitted frame ``frame`` belongs to."""
        return [s.prompt for s in self.scenes if s.frame <= max(frame, 0)][-1]

    def slot_scenes(self, frames: torch.Tensor) -> SlotScenes:
        """The scenes of emitted ``frames`` (warm-up frames, below 0, belong to the first)."""
        starts = torch.tensor([s.frame for s in self.scenes], device=frames.device)
        index = (torch.searchsorted(starts, frames, right=True) - 1).clamp(min=0)
        return SlotScenes(index, tuple(s.anchor == "renew" for s in self.scenes))

    def contexts(self, scene_contexts: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Contexts (len(frames), n, d) of emitted ``frames`` from one context per scene (S, n, d).

        Frames before 0 (warm-up) belong to the first scene. Outside transitions each frame
        gets its scene's context exactly.
        """
        starts = torch.tensor([s.frame for s in self.scenes], device=frames.device)
        lengths = torch.tensor([self.transition if s.transition is None else s.transition for s in self.scenes], device=frames.device)
        j = self.slot_scenes(frames).index
        w = ((frames - starts[j] + 1).to(scene_contexts.dtype) / (lengths[j] + 1)).clamp(0, 1)
        w = torch.where(j > 0, w, torch.ones_like(w))[:, None, None]
        return (1 - w) * scene_contexts[(j - 1).clamp(min=0)] + w * scene_contexts[j]
