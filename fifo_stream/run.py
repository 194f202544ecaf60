"""Run directories: generation that survives kill -9 and resumes frame-identically.

A run directory holds ``run.json`` (what to generate), ``config.yaml`` (the resolved
config), ``manifest.json`` (frames written, each frame's SHA-256, finished segments)
and ``state.pt`` (the engine checkpoint, with a SHA-256 trailer). File outputs are
written as segments in ``segments/``, cut at every checkpoint, and joined into the
requested files by stream copy when the run finishes.

Checkpoint write order: cut the segments (close, fsync, rename), atomically replace
the manifest, then atomically replace the state. On resume the state says how many
frames are done; listed segments beyond that, and unlisted files, are discarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from . import distributed
from .durable import atomic_write
from .errors import FifoStreamError, PeerExit
from .pipeline import Decoder, FrameStream
from .sinks import BackgroundSink, MultiSink, SegmentWriter, Sink, SinkError, join_segments, open_sink, validate_target
from .storyboard import Storyboard

RUN_FILE, MANIFEST, STATE, CONFIG, SEGMENTS = "run.json", "manifest.json", "state.pt", "config.yaml", "segments"
# Crash tests: "point:N" makes the process SIGKILL itself at a checkpoint step
# (segments, manifest, state: during checkpoint N of this process) or after frame N (frame).
FAULT_ENV = "FIFO_STREAM_FAULT"


class RunError(FifoStreamError):
    pass


class OutputLost(FifoStreamError):
    """An output went away mid-run (a pipe's reader, an RTMP server); the checkpoint is kept."""

    exit_code = 3


class Interrupted(FifoStreamError):
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


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


def _fault(point: str, count: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{point}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


class RunDir:
    """A run directory on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.segments = self.path / SEGMENTS

    @classmethod
    def create(cls, path: str | os.PathLike, spec: RunSpec, cfg: DictConfig) -> RunDir:
        run = cls(path)
        if (run.path / RUN_FILE).exists():
            raise RunError(f"{run.path} already holds a run; continue it with 'fifo-stream resume {run.path}' or choose another --run-dir")
        if run.path.exists() and not run.path.is_dir():
            raise RunError(f"run directory {run.path} is a file; choose another --run-dir")
        try:
            run.segments.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {run.path} ({e.strerror}); choose a writable --run-dir") from None
        atomic_write(run.path / CONFIG, OmegaConf.to_yaml(cfg).encode())
        run.write_manifest({"frames_written": 0, "frame_sha256": [], "segments": {}, "finished": False})
        atomic_write(run.path / RUN_FILE, json.dumps(asdict(spec), indent=1).encode())
        return run

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDir:
        run = cls(path)
        if not (run.path / RUN_FILE).is_file():
            raise RunError(f"{run.path} is not a fifo-stream run directory (no {RUN_FILE}); give the --run-dir of a generate command")
        return run

    @property
    def spec(self) -> RunSpec:
        return RunSpec(**json.loads((self.path / RUN_FILE).read_text()))

    @property
    def config(self) -> DictConfig:
        return OmegaConf.load(self.path / CONFIG)

    @property
    def manifest(self) -> dict:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            raise RunError(f"{self.path / MANIFEST} is missing or damaged; the run cannot be resumed") from None

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


def _discard_after(run: RunDir, manifest: dict, done: int) -> dict:
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


class _StopFlag:
    """Records SIGINT/SIGTERM so the loop can stop at a frame boundary with a checkpoint."""

    def __init__(self):
        self.signum: int | None = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, _frame):
        self.signum = signum

    @property
    def code(self) -> int:
        """The exit code the signal asks for (128 + signal number), 0 without one."""
        return 128 + self.signum if self.signum is not None else 0

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _open_state(run: RunDir, identity: str, force: bool) -> tuple[RunSpec, dict | None]:
    """The run's spec and its stream checkpoint (None before the first), refusing another identity's."""
    state = run.load_state()
    if state is not None and state["fingerprint"] != identity and not force:
        raise RunError(f"engine checkpoint in {run.path} was made with another config or model; pass --force to use it anyway")
    return run.spec, state["stream"] if state is not None else None


def execute(run: RunDir | None, model, cfg: DictConfig, identity: str, progress: bool = True, force: bool = False) -> None:
    """Generate (or continue) the run until all its frames are written, checkpointing as it goes.

    ``identity`` is the :func:`fingerprint` of ``cfg`` and the weights; a checkpoint made
    under another identity is refused unless ``force``. Under torchrun every rank calls
    this: rank 0 reads and writes the run directory (``run`` may be None elsewhere) and
    hands the checkpoint to the others, which compute their share of every tick.
    """
    spec, state = distributed.from_main(lambda: _open_state(run, identity, force))
    stream = FrameStream(model, cfg, spec.schedule(cfg.storyboard.transition), spec.seed)
    try:
        if state is not None:
            stream.load_state_dict(state)
        if not distributed.is_main():
            _follow(stream, spec)
            return
        followers = _Followers(stream, spec)
        try:
            _lead(run, stream, spec, cfg, identity, progress, followers)
        except BaseException as e:
            followers.release(getattr(e, "exit_code", 1))
            raise
    finally:
        stream.close()


def _follow(stream: FrameStream, spec: RunSpec) -> None:
    """A rank other than 0: compute this rank's share of every tick until rank 0 says stop."""
    with _StopFlag() as stop:
        while stream.emitted < spec.frames:
            code = distributed.agree(stop.code)
            if code:
                raise PeerExit(code)
            stream.next_latent()


class _Followers:
    """Rank 0's side of :func:`_follow`: the other ranks wait in ``agree`` for each decision
    of the frame loop while it has frames to go, so a way out of the loop must answer them."""

    def __init__(self, stream: FrameStream, spec: RunSpec):
        self.stream, self.spec = stream, spec
        self.waiting = False
        self._update()

    def _update(self) -> None:
        self.waiting = distributed.world_size() > 1 and self.stream.emitted < self.spec.frames

    def advance(self, code: int) -> tuple[int, torch.Tensor | None]:
        """Agree with every rank on ``code`` (0: go on); if all go on, run a tick and return its latent."""
        self.waiting = False  # until the tick is done the others are inside it, not waiting
        code = distributed.agree(code)
        if code:
            return code, None
        z = self.stream.next_latent()
        self._update()
        return 0, z

    def release(self, code: int) -> None:
        """Stop the other ranks with exit ``code`` if they wait for a decision."""
        if self.waiting:
            self.waiting = False
            distributed.agree(code)


def _lead(run: RunDir, stream: FrameStream, spec: RunSpec, cfg: DictConfig, identity: str, progress: bool, followers: _Followers) -> None:
    """Rank 0 (or the only process): the frame loop with outputs, manifest and checkpoints.

    With ``runtime.overlap_decode`` frame k is decoded on a thread while tick k+1 runs and
    written after it; that one-frame lag is drained before every checkpoint.
    """
    manifest = _discard_after(run, run.manifest, stream.emitted)
    run.write_manifest(manifest)

    w, h, fps = cfg.video.width, cfg.video.height, cfg.video.fps
    writers: dict[str, tuple[BackgroundSink, SegmentWriter]] = {}
    live: list[Sink] = []
    try:
        for i, target in enumerate(spec.outputs):
            kind = validate_target(target)
            if kind == "file":
                key = str(i)
                listed = manifest["segments"].setdefault(key, [])
                options = {"codec": cfg.output.codec, "crf": cfg.output.crf, "preset": cfg.output.preset}
                writer = SegmentWriter(run.segments, f"out{i}", Path(target).suffix, w, h, fps, index=len(listed), **options)
                writers[key] = (BackgroundSink(writer), writer)
            elif kind == "png":
                live.append(BackgroundSink(open_sink(target, w, h, fps, start=stream.emitted)))
            elif kind == "pipe":
                live.append(BackgroundSink(open_sink(target, w, h, fps, fmt=spec.pipe_format)))
            else:
                live.append(open_sink(target, w, h, fps))  # RTMP paces on its own thread
    except FifoStreamError:
        with contextlib.suppress(Exception):  # the open failure is the error to report
            MultiSink([bg for bg, _ in writers.values()] + live).close()
        raise
    outputs = MultiSink([bg for bg, _ in writers.values()] + live)

    checkpoints = 0

    def checkpoint() -> None:
        nonlocal checkpoints
        checkpoints += 1
        for key, (bg, writer) in writers.items():
            bg.flush()
            frames = writer.frames_in_segment
            path = writer.cut()
            if path is not None:
                manifest["segments"][key].append({"file": path.name, "frames": frames})
        _fault("segments", checkpoints)
        manifest["frames_written"] = stream.emitted
        run.write_manifest(manifest, lambda: _fault("manifest", checkpoints))
        run.save_state({"stream": stream.state_dict(), "fingerprint": identity}, lambda: _fault("state", checkpoints))

    decoder = Decoder(stream, cfg.runtime.overlap_decode)
    pending: deque[Future] = deque()  # frames computed but not yet written, oldest first

    def write_pending(keep: int = 0, failed: bool = False) -> None:
        """Write all but the newest ``keep`` pending frames; once an output ``failed``, to those that still work."""
        while len(pending) > keep:
            frame = pending.popleft().result()
            manifest["frame_sha256"].append(hashlib.sha256(np.ascontiguousarray(frame).tobytes()).hexdigest())
            try:
                outputs.write(frame)
            except SinkError:
                if not failed:
                    raise
            bar.update(1)
            _fault("frame", len(manifest["frame_sha256"]))

    code = 0
    failure: BaseException | None = None
    close_error: BaseException | None = None
    bar = tqdm(total=spec.frames, initial=stream.emitted, unit="frame", disable=not progress, dynamic_ncols=True)
    try:
        with _StopFlag() as stop:
            while stream.emitted < spec.frames:
                code, z = followers.advance(stop.code)
                if code:
                    break
                pending.append(decoder.submit(z))
                due = stream.emitted % spec.checkpoint_every == 0 and stream.emitted < spec.frames
                write_pending(keep=1 if decoder.background and not due else 0)
                if due:
                    checkpoint()
            write_pending()
            checkpoint()
    except SinkError as e:
        failure = e
        write_pending(failed=True)
        checkpoint()
    finally:
        bar.close()
        decoder.close()
        try:
            outputs.close()
        except BaseException as e:  # reported below, after the failure or stop that may explain it
            close_error = e
    if failure is not None:
        raise OutputLost(f"{failure}; {stream.emitted} frames are saved: continue with 'fifo-stream resume {run.path}'") from None
    if code:
        name = signal.Signals(code - 128).name
        raise Interrupted(f"stopped by {name} after {stream.emitted} frames; checkpoint saved: continue with 'fifo-stream resume {run.path}'", code - 128)
    if close_error is not None:
        raise close_error
    for key, segments in manifest["segments"].items():
        join_segments([run.segments / s["file"] for s in segments], spec.outputs[int(key)])
    manifest["finished"] = True
    run.write_manifest(manifest)
