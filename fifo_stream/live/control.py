"""Prompts given while a run goes on: from the live page (``POST /prompt``) or ``--prompts-from``.

Requests wait in a queue; the frame loop takes at most one between two ticks, checks it like a
command-line prompt, records it in run.json's storyboard and only then applies it (see
``runs.loop``), and answers the request's future with the frame it starts at.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TextIO

from ..errors import FifoStreamError

_LINE = re.compile(r"\s*(\d+)?\s*(renew)?\s*:(.*)", re.DOTALL)


@dataclass
class PromptRequest:
    prompt: str
    transition: int | None = None  # frames blending in from the current prompt (None: storyboard.transition)
    frame: int | None = None  # the emitted frame it starts at (None: the first frame still free)
    anchor: str = "keep"  # keep | renew the subject anchor's reference (a prompt that names a new look)
    source: str = "web"  # web | prompts-from
    answer: Future = field(default_factory=Future)  # -> the frame it starts at, or a FifoStreamError


class LiveControl:
    """The queue of live prompt requests between their sources and the frame loop."""

    def __init__(self):
        self._queue: queue.Queue[PromptRequest] = queue.Queue()

    def submit(self, request: PromptRequest) -> Future:
        self._queue.put(request)
        return request.answer

    def take(self) -> PromptRequest | None:
        """The oldest waiting request, or None."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def refuse_waiting(self, reason: str) -> None:
        """Answer every waiting request with an error (the run has stopped)."""
        while (request := self.take()) is not None:
            request.answer.set_exception(FifoStreamError(reason))


def parse_line(line: str) -> PromptRequest | None:
    """A ``--prompts-from`` line: 'N: text' (from frame N), 'text' (now), 'N renew: text' or 'renew: text'
    (the subject anchor takes this scene's look); None for a blank line or '# comment'."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    match = _LINE.fullmatch(text)
    if match and (match[1] or match[2]):
        frame = None if match[1] is None else int(match[1])
        return PromptRequest(match[3].strip(), frame=frame, anchor="renew" if match[2] else "keep", source="prompts-from")
    return PromptRequest(text, source="prompts-from")


def read_prompts(source: TextIO, control: LiveControl) -> threading.Thread:
    """Feed ``source``'s lines to ``control`` on a daemon thread (the run's progress reports each answer)."""

    def run() -> None:
        for line in source:
            request = parse_line(line)
            if request is not None:
                with contextlib.suppress(FifoStreamError):  # a refusal is reported by the run's progress
                    control.submit(request).result()  # one at a time, in the file's order

    thread = threading.Thread(target=run, name="prompts-from", daemon=True)
    thread.start()
    return thread
