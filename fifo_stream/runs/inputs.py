"""A run's footage: the init image or video and the reference image, read and fitted to the
video size, fingerprinted in run.json at the start and checked again on resume."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
from omegaconf import DictConfig

from ..inputs.fit import fit_frame
from ..inputs.image import read_image
from ..inputs.record import check_input, describe_input
from ..inputs.video import iter_video, read_video_tail, video_grid_length
from ..pipeline import StartClip
from .rundir import RunSpec

ROLES = {"init_image": "init image", "init_video": "init video", "reference": "reference image"}
# SDEdit strength of an init image when none is given (chosen on the embedded model: see README);
# a video's frames are used as they are.
DEFAULT_STRENGTH = {"init_image": 0.8, "init_video": 0.0}


def record_inputs(paths: dict[str, str | None]) -> dict[str, dict]:
    """{role: path, size, SHA-256} of the inputs given (roles as in :data:`ROLES`)."""
    return {role: describe_input(path) for role, path in paths.items() if path is not None}


def check_inputs(spec: RunSpec) -> None:
    """Refuse a run whose inputs are missing or changed since it started."""
    for role, record in (spec.inputs or {}).items():
        check_input(record, ROLES[role])


def load_inputs(spec: RunSpec, cfg: DictConfig, frames_per_window: int) -> tuple[StartClip | None, np.ndarray | None]:
    """The start clip and the reference image of a run, fitted to its video size."""
    inputs, width, height = spec.inputs or {}, cfg.video.width, cfg.video.height
    start = None
    for role in ("init_image", "init_video"):
        if role not in inputs:
            continue
        strength = DEFAULT_STRENGTH[role] if spec.init_strength is None else spec.init_strength
        path = inputs[role]["path"]
        if role == "init_image":
            frames = fit_frame(read_image(path), width, height, spec.fit)[None]
        else:
            tail = read_video_tail(path, frames_per_window, cfg.video.fps, width, height, spec.fit, spec.pad_short)
            if tail.resampled:
                print(f"fifo-stream: {path} runs at {tail.source_fps:g} fps; its frames are resampled to {cfg.video.fps} fps", file=sys.stderr)
            frames = tail.frames
        start = StartClip(frames, strength)
    reference = fit_frame(read_image(inputs["reference"]["path"]), width, height, spec.fit) if "reference" in inputs else None
    return start, reference


def kept_input(spec: RunSpec, cfg: DictConfig) -> Iterator[np.ndarray]:
    """The init video's frames the outputs start with (``--keep-input``), on the grid its continuation is on."""
    return iter_video(spec.inputs["init_video"]["path"], cfg.video.fps, cfg.video.width, cfg.video.height, spec.fit, end_aligned=True)


def kept_input_length(spec: RunSpec, cfg: DictConfig) -> int:
    """How many frames ``kept_input`` gives (from the frame times: no frame is converted or fitted)."""
    return video_grid_length(spec.inputs["init_video"]["path"], cfg.video.fps)
