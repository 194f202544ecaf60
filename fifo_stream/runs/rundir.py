"""A run directory on disk: what to generate, the resolved config, the manifest and the engine checkpoint.

A run directory holds ``run.json`` (what to generate), ``config.yaml`` (the resolved
config), ``manifest.json`` (frames written, each frame's SHA-256, finished segments)
and ``state.pt`` (the engine checkpoint, with a SHA-256 trailer). File outputs are
written as segments in ``segments/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import load_config
from ..consistency.storyboard import Storyboard
from ..durable import atomic_write
from ..errors import FifoStreamError
from . import lock

RUN_FILE, MANIFEST, STATE, CONFIG, SEGMENTS = "run.json", "manifest.json", "state.pt", "config.yaml", "segments"
LIVE_PLAYLIST = "live/index.m3u8"  # the HLS output --serve adds when no --out is a playlist


class RunError(FifoStreamError):
    pass


@dataclass
class RunSpec:
    prompt: str  # the first (or only) prompt
    frames: int
    outputs: list[str]
    seed: int = 0
    checkpoint_every: int = 100
    checkpoint: str | None = None  # model checkpoint path (None: the config's)
    pipe_format: str = "matroska"
    storyboard: list[dict] | None = None  # [{frame, prompt}, ...] (None: ``prompt`` for the whole run)
    inputs: dict[str, dict] | None = None  # the user's footage by role (init_image, init_video, reference): path, size, SHA-256
    init_strength: float | None = None  # SDEdit strength of the init footage (None: the role's default)
    fit: str = "crop"  # how footage is fitted to the video size: crop, pad or stretch
    pad_short: bool = False  # an init video shorter than the window repeats its last frame
    kept_input_frames: int = 0  # --keep-input: the outputs start with this many frames of the init video, then the new ones

    @property
    def output_frames(self) -> int:
        """Frames every output holds when the run is done: the kept input's, then the ``frames`` generated."""
        return self.kept_input_frames + self.frames

    def schedule(self, transition: int) -> Storyboard:
        return Storyboard.parse(self.storyboard or [self.prompt], transition)


def fingerprint(cfg: DictConfig, checkpoint: str | os.PathLike | None) -> str:
    """Identity of everything that determines the frames: the config (less ``runtime``) and the weights file."""
    content = OmegaConf.to_container(cfg, resolve=True)
    content.pop("runtime", None)
    if checkpoint is not None and Path(checkpoint).is_file():
        st = Path(checkpoint).stat()
        content["_weights"] = {"name": Path(checkpoint).name, "size": st.st_size}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _types(hint) -> tuple[type, ...]:
    """The plain classes isinstance needs for a field's annotation (``list[str] | None`` -> (list, NoneType))."""
    if isinstance(hint, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _types(arg))
    return (typing.get_origin(hint) or hint,)


_SPEC_TYPES = {name: _types(hint) for name, hint in typing.get_type_hints(RunSpec).items()}


def _manifest_ok(m) -> bool:
    """Whether ``m`` has the fields and types of a manifest."""
    if not isinstance(m, dict) or not isinstance(m.get("segments"), dict):
        return False
    segments = [s for listed in m["segments"].values() for s in (listed if isinstance(listed, list) else [None])]
    return (
        isinstance(m.get("frames_written"), int)
        and isinstance(m.get("frame_sha256"), list)
        and isinstance(m.get("finished"), bool)
        and all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("frames"), int) for s in segments)
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class RunDir:
    """A run directory on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.segments = self.path / SEGMENTS

    @classmethod
    def check_new(cls, path: str | os.PathLike) -> None:
        """Refuse a run directory that holds a run (or that another process is using)."""
        run = cls(path)
        if (run.path / RUN_FILE).exists():
            lock.check_free(run.path)
            raise RunError(f"{run.path} already holds a run; continue it with 'fifo-stream resume {run.path}' or choose another --run-dir")
        if run.path.exists() and not run.path.is_dir():
            raise RunError(f"run directory {run.path} is a file; choose another --run-dir")

    @classmethod
    def create(cls, path: str | os.PathLike, spec: RunSpec, cfg: DictConfig) -> RunDir:
        """Make a new run directory and hold its lock (see :mod:`fifo_stream.runs.lock`)."""
        run = cls(path)
        cls.check_new(path)
        try:
            run.segments.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {run.path} ({e.strerror}); choose a writable --run-dir") from None
        lock.acquire(run.path)
        cls.check_new(path)  # another process may have created it meanwhile
        atomic_write(run.path / CONFIG, OmegaConf.to_yaml(cfg).encode())
        run.write_manifest({"frames_written": 0, "frame_sha256": [], "segments": {}, "finished": False})
        run.write_spec(spec)
        return run

    def write_spec(self, spec: RunSpec) -> None:
        """Replace run.json (a live prompt extends the storyboard before it is applied)."""
        atomic_write(self.path / RUN_FILE, json.dumps(asdict(spec), indent=1).encode())

    @classmethod
    def open(cls, path: str | os.PathLike, writer: bool = False) -> RunDir:
        """An existing run directory; a ``writer`` (generate, resume) holds its lock, a reader (info) does not."""
        run = cls(path)
        if not (run.path / RUN_FILE).is_file():
            raise RunError(f"{run.path} is not a fifo-stream run directory (no {RUN_FILE}); give the --run-dir of a generate command")
        if writer:
            lock.acquire(run.path)
        return run

    def release(self) -> None:
        lock.release(self.path)

    @property
    def spec(self) -> RunSpec:
        path = self.path / RUN_FILE
        try:
            data = json.loads(path.read_text())
            spec = RunSpec(**data) if isinstance(data, dict) else None
        except (OSError, ValueError, TypeError) as e:
            raise RunError(f"{path} is damaged ({_first_line(e)}); the run cannot be resumed without it: start a new run") from None
        wrong = [f.name for f in fields(RunSpec) if spec is None or not isinstance(getattr(spec, f.name), _SPEC_TYPES[f.name])]
        if wrong:
            raise RunError(f"{path} is damaged ({', '.join(wrong) or 'not an object'}); the run cannot be resumed without it: start a new run")
        return spec

    @property
    def config(self) -> DictConfig:
        """The run's resolved config, validated like any config."""
        path = self.path / CONFIG
        try:
            return load_config(path)
        except FifoStreamError as e:
            raise RunError(f"{path} is damaged or changed by hand: {e}; restore it or start a new run") from None

    @property
    def manifest(self) -> dict:
        path = self.path / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            raise RunError(f"{path} is missing or damaged; the run cannot be resumed") from None
        if not _manifest_ok(manifest):
            raise RunError(f"{path} is damaged (its fields are not those of a manifest); the run cannot be resumed")
        return manifest

    def write_manifest(self, manifest: dict, before_rename=None) -> None:
        atomic_write(self.path / MANIFEST, json.dumps(manifest).encode(), before_rename)

    def save_state(self, state: dict, before_rename=None) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        body = buf.getvalue()
        atomic_write(self.path / STATE, body + hashlib.sha256(body).digest(), before_rename)

    def load_state(self) -> dict | None:
        path = self.path / STATE
        if not path.exists():
            return None
        data = path.read_bytes()
        body, digest = data[:-32], data[-32:]
        if len(data) < 32 or hashlib.sha256(body).digest() != digest:
            raise RunError(f"engine checkpoint {path} is corrupt (checksum mismatch); delete it to restart the run from its beginning")
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)


def discard_after(run: RunDir, manifest: dict, done: int) -> dict:
    """Keep the manifest's first ``done`` frames and the segments within them; delete every other file."""
    manifest = {**manifest, "frame_sha256": manifest["frame_sha256"][:done], "frames_written": done, "finished": False}
    kept: dict[str, list] = {}
    for key, segments in manifest["segments"].items():
        total, kept[key] = 0, []
        for seg in segments:
            if total + seg["frames"] > done:
                break
            total += seg["frames"]
            kept[key].append(seg)
    manifest["segments"] = kept
    listed = {s["file"] for segs in kept.values() for s in segs}
    for path in run.segments.iterdir():
        if path.name not in listed:
            path.unlink()
    return manifest
