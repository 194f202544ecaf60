"""A run's progress, as a terminal bar, JSON lines on stderr, and events for the live page.

Events are dicts with an ``event`` key: ``frame`` (frame, total, fps, eta_s, prompt),
``checkpoint`` (frame), ``prompt`` (frame, prompt, transition, source), ``error`` (message),
``serving`` (url), ``finished`` (frame). ``--progress json`` writes each as one line on stderr.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from typing import TextIO

from tqdm import tqdm

from ..consistency.storyboard import Scene, Storyboard

PROGRESS_MODES = ("bar", "json", "none")
FPS_WINDOW = 16  # frames over which frames/s is measured


class Progress:
    """Progress of one run; thread-safe: the frame loop reports, the web server reads and subscribes."""

    def __init__(self, total: int, storyboard: list[dict], mode: str = "bar", stream: TextIO | None = None):
        self.total, self.done, self.storyboard = total, 0, list(storyboard)
        self.mode, self.stream = mode, stream or sys.stderr
        self.prompt = storyboard[0]["prompt"] if storyboard else ""
        self.checkpoints = 0
        self.errors: list[str] = []
        self._times: list[float] = [time.monotonic()]
        self._lock = threading.Lock()
        self._subscribers: list[queue.Queue] = []
        self._bar: tqdm | None = None

    def start(self, done: int) -> None:
        """The frame loop begins with ``done`` frames already written (a resumed run)."""
        self.done, self._times = done, [time.monotonic()]
        if self.mode == "bar":
            self._bar = tqdm(total=self.total, initial=done, unit="frame", dynamic_ncols=True)

    def _emit(self, event: dict, line: str | None = None) -> None:
        """Send ``event`` to the subscribers, and to stderr: as JSON, or as ``line`` (if any) otherwise."""
        if self.mode == "json":
            print(json.dumps(event), file=self.stream, flush=True)
        elif line is not None:
            tqdm.write(f"fifo-stream: {line}", file=self.stream)
        with self._lock:
            for q in self._subscribers:
                q.put_nowait(event)

    def frame(self, prompt: str) -> None:
        """One more frame written; ``prompt`` is the prompt of its scene."""
        with self._lock:
            self.done += 1
            self.prompt = prompt
            self._times = [*self._times[-FPS_WINDOW:], time.monotonic()]
        if self._bar is not None:
            self._bar.update(1)
        self._emit({"event": "frame", **self.status(brief=True)})

    def checkpoint(self) -> None:
        with self._lock:
            self.checkpoints += 1
            event = {"event": "checkpoint", "frame": self.done, "checkpoints": self.checkpoints}
        self._emit(event)

    def scene(self, scene: Scene, source: str) -> None:
        """``scene`` was added to the storyboard."""
        entry = Storyboard((scene,)).to_json()[0]
        with self._lock:
            self.storyboard.append(entry)
        self._emit({"event": "prompt", "transition": None, "anchor": "keep", **entry, "source": source},
                   f"prompt from frame {scene.frame} ({source}): {scene.prompt}" + (" (anchor renew)" if scene.anchor == "renew" else ""))

    def error(self, message: str) -> None:
        with self._lock:
            self.errors = [*self.errors[-9:], message]
        self._emit({"event": "error", "message": message}, message)

    def note(self, event: dict, line: str | None = None) -> None:
        """Any other event (``serving``, ``finished``), with its terminal ``line``."""
        self._emit(event, line)

    def status(self, brief: bool = False) -> dict:
        """frame, total, fps, eta_s and the current prompt; with the storyboard, checkpoints and errors unless ``brief``."""
        with self._lock:
            span = self._times[-1] - self._times[0]
            fps = (len(self._times) - 1) / span if span > 0 else None
            status = {
                "frame": self.done, "total": self.total, "fps": None if fps is None else round(fps, 3),
                "eta_s": None if not fps else round((self.total - self.done) / fps, 1), "prompt": self.prompt,
            }
            if not brief:
                status.update(storyboard=list(self.storyboard), checkpoints=self.checkpoints, errors=list(self.errors))
        return status

    def subscribe(self) -> queue.Queue:
        """A queue that receives every later event (for a live page's event stream)."""
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            self._subscribers.remove(q)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
