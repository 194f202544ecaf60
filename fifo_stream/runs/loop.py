"""The run loop: generation that survives kill -9 and resumes frame-identically.

Frames go to every output of the run (see :mod:`.outputs`) and their SHA-256 to the
run directory's manifest (see :mod:`.rundir`); every ``checkpoint_every`` frames, and
when the run stops, a checkpoint is written. File outputs are joined into the
requested files by stream copy when the run finishes. With ``--keep-input`` the outputs
start with the init video's frames, written before the first tick and checkpointed, so
that a state on disk means they are all written.

Checkpoint write order: cut the segments (close, fsync, rename), atomically replace
the manifest, then atomically replace the state. On resume the state says how many
frames are done; listed segments beyond that, and unlisted files, are discarded.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections import deque
from concurrent.futures import Future

import numpy as np
import torch
from omegaconf import DictConfig

from . import distributed
from ..errors import FifoStreamError, PeerExit
from ..live import LiveControl, Progress, write_preview
from ..outputs.base import SinkError
from ..pipeline import Decoder, FrameStream
from .outputs import Outputs
from .inputs import kept_input, load_inputs
from .rundir import RunDir, RunError, RunSpec, discard_after

# Crash tests: "point:N" makes the process SIGKILL itself at a checkpoint step
# (segments, manifest, state: during checkpoint N of this process), after frame N (frame),
# or once the outputs are joined but before the run is marked finished (join:1).
FAULT_ENV = "FIFO_STREAM_FAULT"


class OutputLost(FifoStreamError):
    """An output went away mid-run (a pipe's reader, an RTMP server); the checkpoint is kept."""

    exit_code = 3


class Interrupted(FifoStreamError):
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _fault(point: str, count: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{point}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


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


def execute(
    run: RunDir | None, model, cfg: DictConfig, identity: str, progress: Progress | None = None, force: bool = False,
    control: LiveControl | None = None, preview_every: int = 0,
) -> None:
    """Generate (or continue) the run until all its frames are written, checkpointing as it goes.

    ``identity`` is the :func:`fingerprint` of ``cfg`` and the weights; a checkpoint made
    under another identity is refused unless ``force``. Under torchrun every rank calls
    this: rank 0 reads and writes the run directory (``run`` may be None elsewhere) and
    hands the checkpoint to the others, which compute their share of every tick.

    ``progress`` reports frames, checkpoints and prompt changes (none if None); ``control``
    brings live prompts (one process only); every ``preview_every`` frames the latest
    frame is written to the run directory's preview.jpg.
    """
    spec, state = distributed.from_main(lambda: _open_state(run, identity, force))
    start, reference = distributed.from_main(lambda: load_inputs(spec, cfg, model.frames_per_window))
    stream = FrameStream(model, cfg, spec.schedule(cfg.storyboard.transition), spec.seed, start, reference)
    try:
        if state is not None:
            stream.load_state_dict(state)
        if not distributed.is_main():
            _follow(stream, spec)
            return
        followers = _Followers(stream, spec)
        live = _Watchers(progress or Progress(spec.output_frames, [], "none"), control, preview_every)
        try:
            _Leader(run, stream, spec, cfg, identity, live, followers, resumed=state is not None).run()
        except BaseException as e:
            followers.release(getattr(e, "exit_code", 1))
            raise
        finally:
            live.stop()
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


class _Watchers:
    """What watches and steers the frame loop: progress, live prompts, the preview image."""

    def __init__(self, progress: Progress, control: LiveControl | None, preview_every: int):
        self.progress, self.control, self.preview_every = progress, control, preview_every

    def stop(self) -> None:
        self.progress.close()
        if self.control is not None:
            self.control.refuse_waiting("the run has stopped")


class _Leader:
    """Rank 0 (or the only process): the frame loop with outputs, manifest and checkpoints.

    With ``runtime.overlap_decode`` frame k is decoded on a thread while tick k+1 runs and
    written after it; that one-frame lag is drained before every checkpoint.
    """

    def __init__(self, run: RunDir, stream: FrameStream, spec: RunSpec, cfg: DictConfig, identity: str, live: _Watchers,
                 followers: _Followers, resumed: bool):
        self.run_dir, self.stream, self.spec, self.cfg, self.identity, self.followers = run, stream, spec, cfg, identity, followers
        self.kept = spec.kept_input_frames if resumed else 0  # the kept input's frames already written
        self.manifest = discard_after(run, run.manifest, self.kept + stream.emitted)
        run.write_manifest(self.manifest)
        self.outputs = Outputs(run, spec, cfg, self.manifest["segments"], self.kept + stream.emitted)
        self.checkpoints = 0
        self.decoder = Decoder(stream, cfg.runtime.overlap_decode)
        self.pending: deque[Future] = deque()  # frames computed but not yet written, oldest first
        self.live, self.progress = live, live.progress
        self.progress.start(self.kept + stream.emitted)

    def checkpoint(self) -> None:
        """Cut the segments, then replace the manifest, then the engine state (each step a crash point).

        A write that fails (a full disk) leaves the previous checkpoint in force: resume starts from it.
        None is written before the kept input is (a state on disk says it is all written).
        """
        if self.kept < self.spec.kept_input_frames:
            return
        self.checkpoints += 1
        count = self.checkpoints
        saved = self.manifest["frames_written"]
        self.outputs.cut()
        _fault("segments", count)
        try:
            self.manifest["frames_written"] = self.kept + self.stream.emitted
            self.run_dir.write_manifest(self.manifest, lambda: _fault("manifest", count))
            self.run_dir.save_state({"stream": self.stream.state_dict(), "fingerprint": self.identity}, lambda: _fault("state", count))
            self.progress.checkpoint()
        except OSError as e:
            raise OutputLost(
                f"writing the checkpoint in {self.run_dir.path} failed ({e.strerror}); the run is saved at frame {saved}: "
                f"free space, then continue with 'fifo-stream resume {self.run_dir.path}'"
            ) from None

    def write_pending(self, keep: int = 0, failed: bool = False) -> None:
        """Write all but the newest ``keep`` pending frames; once an output ``failed``, to those that still work."""
        while len(self.pending) > keep:
            self.write(self.pending.popleft().result(), failed)

    def write(self, frame: np.ndarray, failed: bool = False) -> None:
        """Write one frame to the outputs and the manifest (see :meth:`write_pending` for ``failed``)."""
        self.manifest["frame_sha256"].append(hashlib.sha256(np.ascontiguousarray(frame).tobytes()).hexdigest())
        try:
            self.outputs.write(frame)
        except SinkError:
            if not failed:
                raise
        done = len(self.manifest["frame_sha256"])
        self.progress.frame(self.stream.storyboard.prompt_at(max(done - 1 - self.spec.kept_input_frames, 0)))
        if self.live.preview_every and done % self.live.preview_every == 0:
            write_preview(self.run_dir.path, frame)
        _fault("frame", done)

    def write_kept_input(self) -> None:
        """``--keep-input``: write the init video's frames, then a checkpoint, before the first tick."""
        for frame in kept_input(self.spec, self.cfg):
            self.write(frame)
        self.kept = len(self.manifest["frame_sha256"])
        if self.kept != self.spec.kept_input_frames:
            raise RunError(f"the init video gave {self.kept} frames, but {self.spec.kept_input_frames} were counted when the run started")
        self.checkpoint()

    def take_prompt(self) -> None:
        """Apply one waiting live prompt: check it, record it in run.json, then add it to the stream."""
        request = self.live.control.take() if self.live.control is not None else None
        if request is None:
            return
        try:
            frame = self.stream.live_frame if request.frame is None else request.frame
            if frame >= self.spec.frames:
                raise FifoStreamError(f"frame {frame} is past the video's last frame ({self.spec.frames - 1})")
            storyboard = self.stream.plan_scene(frame, request.prompt, request.transition, request.anchor)
        except FifoStreamError as e:
            self.progress.error(f"prompt refused ({request.source}): {e}")
            request.answer.set_exception(e)
            return
        self.spec.storyboard = storyboard.to_json()
        self.run_dir.write_spec(self.spec)
        self.stream.add_scene(frame, request.prompt, request.transition, request.anchor)
        self.progress.scene(storyboard.scenes[-1], request.source)
        request.answer.set_result(frame)

    def frames(self) -> int:
        """Generate and write frames until all are done or a signal stops the job; returns its exit code (0: none)."""
        code = 0
        with _StopFlag() as stop:
            if self.kept < self.spec.kept_input_frames:
                self.write_kept_input()
            while self.stream.emitted < self.spec.frames:
                self.take_prompt()
                code, z = self.followers.advance(stop.code)
                if code:
                    break
                self.pending.append(self.decoder.submit(z))
                due = self.stream.emitted % self.spec.checkpoint_every == 0 and self.stream.emitted < self.spec.frames
                self.write_pending(keep=1 if self.decoder.background and not due else 0)
                if due:
                    self.checkpoint()
            self.write_pending()
            self.checkpoint()
        return code

    def run(self) -> None:
        """The whole run: frames, a checkpoint at the end (also when an output is lost), then the joined files."""
        code = 0
        failure: SinkError | None = None
        close_error: BaseException | None = None
        try:
            code = self.frames()
        except SinkError as e:
            failure = e
            if not self.outputs.files_failed:  # a live output went away: save what the files hold
                self.write_pending(failed=True)
                self.checkpoint()
        finally:
            self.decoder.close()
            try:
                self.outputs.close()
            except BaseException as e:  # reported below, after the failure or stop that may explain it
                close_error = e
        self._stopped(failure, code)
        if close_error is not None:
            raise close_error
        self.outputs.join()
        _fault("join", 1)
        self.outputs.verify(self.spec.output_frames)
        self.manifest["finished"] = True
        self.run_dir.write_manifest(self.manifest)
        self.progress.note({"event": "finished", "frame": self.spec.output_frames})

    def _stopped(self, failure: SinkError | None, code: int) -> None:
        """Raise why the run stopped early: an output lost, or a signal (exit ``code``)."""
        resume = f"continue with 'fifo-stream resume {self.run_dir.path}'"
        if failure is not None and self.outputs.files_failed:
            saved = self.manifest["frames_written"]
            raise OutputLost(f"{failure}; the run is saved at its last checkpoint ({saved} frames): free space, then {resume}") from None
        if failure is not None:
            raise OutputLost(f"{failure}; {self.stream.emitted} frames are saved: {resume}") from None
        if code:
            name = signal.Signals(code - 128).name
            raise Interrupted(f"stopped by {name} after {self.stream.emitted} frames; checkpoint saved: {resume}", code - 128)
