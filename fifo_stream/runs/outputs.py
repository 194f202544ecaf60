"""Every output of a run, as the run loop writes them.

File outputs are written as segments in the run directory (each behind a background
thread), cut at every checkpoint and joined into the requested files when the run
finishes; PNG directories, HLS playlists and pipes are written live behind background
threads (a playlist's open segment also ends at every checkpoint, so that a resumed run
continues it), and RTMP streams directly (they pace on their own thread).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ..errors import FifoStreamError
from .rundir import RunError
from ..outputs.base import Sink
from ..outputs.base import SinkError
from ..outputs.segments import SegmentWriter, count_frames, join_segments
from ..outputs.targets import open_sink, validate_target
from ..outputs.workers import BackgroundSink, MultiSink
from .rundir import RunDir, RunSpec


class Outputs:
    """Opens every output of ``spec``; ``segments`` is the manifest's record of finished segments per file output.

    ``start`` is the number of frames already written (PNG numbering and HLS playlists continue from it).
    If one output cannot be opened, those already open are closed and the error raised.
    """

    def __init__(self, run: RunDir, spec: RunSpec, cfg: DictConfig, segments: dict[str, list], start: int):
        self.run, self.spec, self.segments = run, spec, segments
        self.writers: dict[str, tuple[BackgroundSink, SegmentWriter]] = {}
        self.live: list[Sink] = []
        self.playlists: list[BackgroundSink] = []  # HLS, also in ``live``
        self._cut_failed = False
        try:
            for i, target in enumerate(spec.outputs):
                self._open(i, target, cfg, start)
        except FifoStreamError:
            with contextlib.suppress(Exception):  # the open failure is the error to report
                self._all().close()
            raise
        self._sinks = self._all()

    def _all(self) -> MultiSink:
        return MultiSink([bg for bg, _ in self.writers.values()] + self.live)

    def _open(self, i: int, target: str, cfg: DictConfig, start: int) -> None:
        w, h, fps = cfg.video.width, cfg.video.height, cfg.video.fps
        kind = validate_target(target)
        if kind == "file":
            key = str(i)
            listed = self.segments.setdefault(key, [])
            options = {"codec": cfg.output.codec, "crf": cfg.output.crf, "preset": cfg.output.preset}
            writer = SegmentWriter(self.run.segments, f"out{i}", Path(target).suffix, w, h, fps, index=len(listed), **options)
            self.writers[key] = (BackgroundSink(writer), writer)
        elif kind == "png":
            self.live.append(BackgroundSink(open_sink(target, w, h, fps, start=start)))
        elif kind == "hls":
            o = cfg.output
            sink = open_sink(target, w, h, fps, start=start, frames=self.spec.output_frames, list_size=o.hls_list_size,
                             segment_seconds=o.hls_segment_seconds, codec=o.codec, crf=o.crf, preset=o.preset)
            self.playlists.append(BackgroundSink(sink))
            self.live.append(self.playlists[-1])
        elif kind == "pipe":
            self.live.append(BackgroundSink(open_sink(target, w, h, fps, fmt=self.spec.pipe_format)))
        else:
            self.live.append(open_sink(target, w, h, fps))  # RTMP paces on its own thread

    def write(self, frame: np.ndarray) -> None:
        """Write one frame to every output."""
        self._sinks.write(frame)

    def cut(self) -> list[Path]:
        """Finish the open segment of every file output (once its frames are written) and list it in ``segments``,
        and that of every HLS playlist.

        Returns the finished segment files of the file outputs (none for one without frames since the last cut).
        """
        finished = []
        for key, (bg, writer) in self.writers.items():
            bg.flush()
            frames = writer.frames_in_segment
            try:
                path = writer.cut()
            except SinkError:
                self._cut_failed = True
                raise
            if path is not None:
                self.segments[key].append({"file": path.name, "frames": frames})
                finished.append(path)
        for bg in self.playlists:
            bg.flush(then=bg.sink.cut)
        return finished

    @property
    def files_failed(self) -> bool:
        """Whether a file output or an HLS playlist failed: its frames since the last checkpoint are lost, so no later
        checkpoint may be written (resume continues it from the last one)."""
        workers = [bg for bg, _ in self.writers.values()] + self.playlists
        return self._cut_failed or any(bg.failed for bg in workers)

    def close(self) -> None:
        """Close every output, then raise the first error any of them raised."""
        self._sinks.close()

    def join(self) -> None:
        """Join each file output's listed segments into the file the user asked for."""
        for key, listed in self.segments.items():
            join_segments([self.run.segments / s["file"] for s in listed], self.spec.outputs[int(key)])

    def verify(self, frames: int) -> None:
        """Check that every file output's segments, and the joined file read back, hold ``frames`` frames."""
        for key, listed in self.segments.items():
            target = self.spec.outputs[int(key)]
            listed_frames, held = sum(s["frames"] for s in listed), count_frames(target)
            if listed_frames != frames or held != frames:
                raise RunError(
                    f"{target} holds {held} frames and its segments {listed_frames}, but {frames} were made; the run is not "
                    f"marked finished: check the disk, then 'fifo-stream resume {self.run.path}' joins it again"
                )
