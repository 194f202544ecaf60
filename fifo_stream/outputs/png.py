"""Each frame as its own lossless PNG file."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from ..durable import atomic_write
from .base import Sink, SinkError, _check_frame, _make_dir


class PngSink(Sink):
    """Each frame as a PNG file ``000000.png``, ``000001.png``, ... in ``directory``.

    Files appear atomically (written under a temporary name, then renamed). ``start``
    is the first file number; ``width``/``height``, when given, are checked on each frame.
    """

    def __init__(self, directory: str | os.PathLike, width: int | None = None, height: int | None = None, start: int = 0) -> None:
        self.directory = Path(directory)
        self.width, self.height = width, height
        self.index = start
        if self.directory.exists() and not self.directory.is_dir():
            raise SinkError(f"{self.directory} is a file, not a directory; give a directory path for PNG frames")
        _make_dir(self.directory, "frame")
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise SinkError(f"frame directory {self.directory} is not writable; choose a writable location")
        self._codec: av.CodecContext | None = None

    def write(self, frame: np.ndarray) -> None:
        array = np.asarray(frame)
        height, width = (self.height, self.width) if self.width else array.shape[:2]
        array = _check_frame(array, width, height)
        if self._codec is None:
            self._codec = av.CodecContext.create("png", "w")
            self._codec.width, self._codec.height, self._codec.pix_fmt = width, height, "rgb24"
            self.width, self.height = width, height
        data = b"".join(bytes(p) for p in self._codec.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        path = self.directory / f"{self.index:06d}.png"
        try:
            atomic_write(path, data, tmp=path.with_name(f".{path.name}.tmp"))
        except OSError as e:
            raise SinkError(f"writing {path} failed ({e.strerror}); check free disk space") from None
        self.index += 1

    def close(self) -> None:
        self._codec = None
