"""Storyboard prompts: which prompt conditions each emitted frame, with linear transitions.

A storyboard is a list of scenes (first frame, prompt); frame numbers are emitted frame
numbers, 0 being the first frame of the output. With a transition of L frames, frame e of
scene j (which starts at N_j) has the context (1 - w) c_(j-1) + w c_j with
w = min(1, (e - N_j + 1) / (L + 1)): the L frames N_j .. N_j + L - 1 blend, N_j + L is pure.
The FIFO queue gives every slot the context of the frame it becomes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..errors import FifoStreamError

_NUMBERED = re.compile(r"\s*([+-]?\d+)\s*:(.*)", re.DOTALL)


class StoryboardError(FifoStreamError):
    pass


def _scene(entry, first: bool) -> tuple[int | None, str]:
    """(frame or None, prompt) of one entry: 'text', 'N: text' or {frame: N, prompt: text}."""
    if isinstance(entry, Mapping):
        if set(entry) != {"frame", "prompt"} or not isinstance(entry["frame"], int) or not isinstance(entry["prompt"], str):
            raise StoryboardError(f"storyboard entry {dict(entry)!r} must be 'N: text' or {{frame: N, prompt: text}}")
        frame, text = entry["frame"], entry["prompt"]
    elif isinstance(entry, str):
        match = _NUMBERED.fullmatch(entry)
        frame, text = (int(match[1]), match[2]) if match else (None, entry)
        if frame is None and not first:
            raise StoryboardError(f"prompt {entry!r} needs the frame it starts at: write 'N: {entry.strip()}' (only the first prompt may leave it out)")
    else:
        raise StoryboardError(f"storyboard entry {entry!r} must be 'N: text' or {{frame: N, prompt: text}} (quote 'N: text' in YAML)")
    if not text.strip():
        raise StoryboardError(f"storyboard entry {entry!r} has no prompt text")
    if frame is not None and frame < 0:
        raise StoryboardError(f"storyboard entry {entry!r}: frame numbers must be >= 0")
    return frame, text.strip()


@dataclass(frozen=True)
class Storyboard:
    scenes: tuple[tuple[int, str], ...]  # (first emitted frame, prompt); starts at 0, strictly increasing
    transition: int = 0

    @classmethod
    def parse(cls, entries: Sequence[str | Mapping], transition: int = 0) -> Storyboard:
        """Scenes from entries 'text' (the first only), 'N: text' or {frame: N, prompt: text}."""
        if not entries:
            raise StoryboardError("no prompt given: pass PROMPT, --prompt 'text' or storyboard.prompts")
        scenes = []
        for i, entry in enumerate(entries):
            frame, text = _scene(entry, first=i == 0)
            frame = 0 if frame is None else frame
            if i == 0 and frame != 0:
                raise StoryboardError(
                    f"the first prompt must start at frame 0, not {frame}: leave out its number "
                    f"(or write '0: {str(entry).strip()}' if the number is part of the prompt)"
                )
            if scenes and frame <= scenes[-1][0]:
                raise StoryboardError(f"storyboard frame numbers must increase: {frame} follows {scenes[-1][0]}")
            if scenes and frame - scenes[-1][0] < transition:
                raise StoryboardError(
                    f"prompts at frames {scenes[-1][0]} and {frame} are closer than the {transition}-frame transition; "
                    "space them further apart or shorten storyboard.transition"
                )
            scenes.append((frame, text))
        return cls(tuple(scenes), int(transition))

    @property
    def prompts(self) -> list[str]:
        """The distinct prompts, in order of first use."""
        return list(dict.fromkeys(p for _, p in self.scenes))

    def to_json(self) -> list[dict]:
        return [{"frame": f, "prompt": p} for f, p in self.scenes]

    def describe(self) -> list[str]:
        return [f"{f}: {p}" for f, p in self.scenes]

    def contexts(self, scene_contexts: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Contexts (len(frames), n, d) of emitted ``frames`` from one context per scene (S, n, d).

        Frames before 0 (warm-up) belong to the first scene. Outside transitions each frame
        gets its scene's context exactly.
        """
        starts = torch.tensor([f for f, _ in self.scenes], device=frames.device)
        j = (torch.searchsorted(starts, frames, right=True) - 1).clamp(min=0)
        w = ((frames - starts[j] + 1).to(scene_contexts.dtype) / (self.transition + 1)).clamp(0, 1)
        w = torch.where(j > 0, w, torch.ones_like(w))[:, None, None]
        return (1 - w) * scene_contexts[(j - 1).clamp(min=0)] + w * scene_contexts[j]
