"""Sinks over other sinks: a background thread behind a bounded queue, and one frame to many sinks."""

from __future__ import annotations

import queue
import threading
from abc import abstractmethod
from typing import Callable, Sequence

import numpy as np

from .base import Sink, SinkError

_END = object()  # queue sentinel: no more frames


class _Call:
    """A queue item among the frames: ``fn`` (None: nothing) runs on the worker thread, then ``done`` is set."""

    def __init__(self, fn: Callable[[], object] | None) -> None:
        self.fn, self.done = fn, threading.Event()


class _Worker(Sink):
    """A sink whose frames are consumed by a background thread through a bounded queue.

    An exception in the thread is re-raised once, on the next ``write`` or on ``close``;
    after it the thread keeps draining the queue so that the producer never blocks.
    """

    def __init__(self, maxsize: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._error: BaseException | None = None
        self._reported = False
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=f"sink-{type(self).__name__}", daemon=True)
        self._thread.start()

    @abstractmethod
    def _work(self) -> None:
        """Consume ``self._queue`` until ``_END``."""

    def _main(self) -> None:
        try:
            self._work()
        except BaseException as e:
            self._error = e
            while (item := self._queue.get()) is not _END:
                if isinstance(item, _Call):
                    item.done.set()

    @property
    def failed(self) -> bool:
        """Whether the thread stopped on an error."""
        return self._error is not None

    def _raise_error(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def _put(self, item: object) -> None:
        self._raise_error()
        if self._error is not None or self._closed:
            raise SinkError(f"cannot write to the {type(self).__name__}: it has failed or is closed")
        self._queue.put(item)

    def _stop(self) -> bool:
        """Send ``_END`` and wait for the thread; False if already stopped."""
        if self._closed:
            return False
        self._closed = True
        self._queue.put(_END)
        self._thread.join()
        return True


class BackgroundSink(_Worker):
    """Runs another sink's ``write`` on a background thread fed by a bounded queue.

    The producer only waits when ``maxsize`` frames are pending. An exception raised by the
    inner sink is re-raised on the producer's next ``write`` or on ``close``; ``close``
    drains the queue and closes the inner sink. Frames must not be modified after ``write``.
    """

    def __init__(self, sink: Sink, maxsize: int = 16) -> None:
        self.sink = sink
        super().__init__(maxsize)

    def _work(self) -> None:
        while (item := self._queue.get()) is not _END:
            if isinstance(item, _Call):
                try:
                    if item.fn is not None:
                        item.fn()
                except BaseException as e:
                    self._error = e  # before the waiting producer wakes
                    raise
                finally:
                    item.done.set()
            else:
                self.sink.write(item)

    def write(self, frame: np.ndarray) -> None:
        self._put(frame)

    def flush(self, then: Callable[[], object] | None = None) -> None:
        """Wait until every frame written so far has reached the inner sink (re-raising its error).

        ``then`` (e.g. the inner sink's ``cut``) runs on the thread after those frames; an error
        in it fails the sink like one in ``write``.
        """
        call = _Call(then)
        self._put(call)
        call.done.wait()
        self._raise_error()

    def close(self) -> None:
        if not self._stop():
            return
        try:
            self.sink.close()
        except BaseException:
            if self._error is None:
                raise
        self._raise_error()


class MultiSink(Sink):
    """Writes every frame to several sinks; wrap slow ones in ``BackgroundSink`` so they run in parallel.

    A sink that fails does not cost the others the frame (a playlist or PNG numbering would lose its place).
    """

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)

    def _each(self, call: Callable[[Sink], object]) -> None:
        """``call`` every sink, then raise the first error any of them raised."""
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                call(sink)
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first

    def write(self, frame: np.ndarray) -> None:
        """Write the frame to every sink, then raise the first error any of them raised."""
        self._each(lambda sink: sink.write(frame))

    def close(self) -> None:
        """Close every sink, then raise the first error any of them raised."""
        self._each(lambda sink: sink.close())
