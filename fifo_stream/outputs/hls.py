"""An HLS live playlist: MPEG-TS segments beside an .m3u8 that is replaced after each one."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from ..durable import atomic_write, durable_replace
from .base import _AV_ERRORS, Sink, SinkError, _check_frame, _check_size, _codec_options, _finish, _make_dir, _rate, _reason, _VideoOut
from .formats import HLS_FORMAT

_SEGMENT = re.compile(r"\.?seg\d{6,}\.ts(\.tmp)?")  # a segment, or one being written
# Before each segment: its first frame and frame count. Players skip it as a comment (it does not start with #EXT).
FRAMES_TAG = "#FIFO-STREAM-FRAMES:"


def _name(index: int) -> str:
    return f"seg{index:06d}.ts"


@dataclass(frozen=True)
class _Segment:
    index: int  # its media sequence number
    first: int  # frame index of its first frame
    frames: int
    discontinuity: bool = False  # preceded by #EXT-X-DISCONTINUITY

    @property
    def name(self) -> str:
        return _name(self.index)

    @property
    def end(self) -> int:
        return self.first + self.frames


def check_playlist_target(path: Path) -> None:
    """Refuse an HLS playlist path that is an existing directory."""
    if path.is_dir():
        raise SinkError(f"HLS playlist path {path} is a directory; give a file name such as {path / 'index.m3u8'}")


class HlsSink(Sink):
    """An HLS playlist of MPEG-TS segments ``seg000000.ts``, ... of about ``segment_seconds`` each.

    Every segment has its own encoder, so it starts with a keyframe; timestamps are the frame
    index (no B-frames), so the segments play as one stream. A segment is written under a
    temporary name, renamed, and only then listed; the playlist is replaced atomically.
    ``cut()`` ends the open segment early. ``close()`` writes ``#EXT-X-ENDLIST`` once ``frames``
    frames are done in all (None: on any close); before that the playlist stays live.
    ``list_size`` > 0 lists only the newest segments; a segment's file is deleted once it has
    been out of the playlist for ``list_size`` more (clients may still be fetching it).
    ``start`` > 0 continues the playlist after its first ``start`` frames: later segments are
    dropped and the next one follows an ``#EXT-X-DISCONTINUITY`` (no playlist: a new one
    starts at frame ``start``). Each segment's frames are kept in a ``FRAMES_TAG`` comment.
    """

    def __init__(
        self,
        playlist: str | os.PathLike,
        width: int,
        height: int,
        fps: float,
        *,
        start: int = 0,
        frames: int | None = None,
        list_size: int = 0,
        segment_seconds: float = 2.0,
        codec: str | None = None,
        crf: int = 18,
        preset: str = "veryfast",
        pix_fmt: str = "yuv420p",
        codec_options: dict | None = None,
    ) -> None:
        self.playlist = Path(playlist)
        self.directory = self.playlist.parent
        self.width, self.height = width, height
        self.frames, self.list_size = frames, list_size
        self.done = start  # frame index of the next frame
        _check_size(width, height, pix_fmt)
        self.rate = _rate(fps)
        if segment_seconds <= 0 or list_size < 0:
            raise SinkError(f"HLS needs segment_seconds > 0 and list_size >= 0, got {segment_seconds} and {list_size}")
        self.segment_frames = max(1, round(segment_seconds * self.rate))
        codec = codec or HLS_FORMAT.codec
        # bf=0: with B-frames each fresh encoder would delay its first timestamps, and segments would overlap.
        self._encoder = (codec, pix_fmt, {**_codec_options(codec, crf, preset, None, codec_options), "bf": "0"})
        check_playlist_target(self.playlist)
        _make_dir(self.directory, "HLS")
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise SinkError(f"HLS directory {self.directory} is not writable; choose a writable location")
        self._out: _VideoOut | None = None
        self._in_segment = 0  # frames in the open segment
        self._closed = self._ended = False
        self._continue(start)
        self._write_playlist()
        self._remove_unlisted()

    def _continue(self, start: int) -> None:
        """Keep the listed segments within the first ``start`` frames; the next one is numbered after them."""
        listed, self._discontinuities = self._read() if start and self.playlist.exists() else ([], 0)
        self.segments = [s for s in listed if s.end <= start]
        dropped = listed[len(self.segments):]
        # With list_size the segment that ends at ``start`` may have left the list already; none may cross it.
        if (self.segments and self.segments[-1].end != start) or (dropped and dropped[0].first < start):
            raise SinkError(
                f"HLS playlist {self.playlist} has no segment boundary at frame {start}, where the run continues; "
                f"restore it with its segments, or delete it to start a new playlist at frame {start}"
            )
        # Nothing kept: new numbers, past those clients have seen.
        self._next = (self.segments or listed)[-1].index + 1 if listed else 0
        self._discontinuity = bool(listed)  # before the next segment

    def _read(self) -> tuple[list[_Segment], int]:
        """The segments a playlist written by this class lists, and its discontinuity sequence."""
        try:
            lines = self.playlist.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SinkError(f"cannot read HLS playlist {self.playlist} ({_reason(e)}); delete it to start a new playlist") from None
        segments, discontinuities, sequence = [], 0, 0
        frames, discontinuity = None, False
        for line in filter(None, (line.strip() for line in lines)):
            try:
                if line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
                    sequence = int(line.partition(":")[2])
                elif line.startswith("#EXT-X-DISCONTINUITY-SEQUENCE:"):
                    discontinuities = int(line.partition(":")[2])
                elif line == "#EXT-X-DISCONTINUITY":
                    discontinuity = True
                elif line.startswith(FRAMES_TAG):
                    first, count = (int(v) for v in line[len(FRAMES_TAG):].split(","))
                    frames = first, count
                elif not line.startswith("#"):
                    index = sequence + len(segments)
                    if frames is None or line != _name(index):
                        raise ValueError(line)
                    segments.append(_Segment(index, *frames, discontinuity))
                    frames, discontinuity = None, False
            except ValueError:
                raise SinkError(
                    f"HLS playlist {self.playlist} was not written by fifo-stream (at {line!r}); delete it to start a new playlist"
                ) from None
        return segments, discontinuities

    def _write_playlist(self) -> None:
        first = self.segments[0].index if self.segments else self._next
        longest = max([self.segment_frames, *(s.frames for s in self.segments)])
        lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{math.ceil(longest / self.rate)}", f"#EXT-X-MEDIA-SEQUENCE:{first}"]
        if self._discontinuities:
            lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{self._discontinuities}")
        for s in self.segments:
            if s.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            lines += [f"{FRAMES_TAG}{s.first},{s.frames}", f"#EXTINF:{float(s.frames / self.rate):.6f},", s.name]
        if self._ended:
            lines.append("#EXT-X-ENDLIST")
        try:
            atomic_write(self.playlist, ("\n".join(lines) + "\n").encode(), tmp=self.directory / f".{self.playlist.name}.tmp")
        except OSError as e:
            raise SinkError(f"writing HLS playlist {self.playlist} failed ({e.strerror}); check free disk space") from None

    def _remove_unlisted(self) -> None:
        """Delete the segment files (and unfinished ones) the playlist does not list, less those ``list_size`` keeps."""
        keep = {s.name for s in self.segments}
        if self.segments:
            first = self.segments[0].index
            keep |= {_name(i) for i in range(max(0, first - self.list_size), first)}
        for path in self.directory.iterdir():
            if _SEGMENT.fullmatch(path.name) and path.name not in keep:
                path.unlink(missing_ok=True)

    def _tmp(self) -> Path:
        return self.directory / f".{_name(self._next)}.tmp"

    def write(self, frame: np.ndarray) -> None:
        if self._closed:
            raise SinkError(f"HLS playlist {self.playlist} is already closed")
        array = _check_frame(frame, self.width, self.height)
        if self._out is None:
            codec, pix_fmt, options = self._encoder
            try:
                container = av.open(str(self._tmp()), "w", format=HLS_FORMAT.name,
                                    container_options={"mpegts_flags": "+initial_discontinuity"})  # counters restart per segment
                self._out = _VideoOut(container, self.width, self.height, self.rate, codec, pix_fmt, options, self.segment_frames)
            except SinkError:
                raise
            except _AV_ERRORS as e:
                raise SinkError(f"cannot write {self._tmp()} ({_reason(e)}); check that the directory is writable") from None
        try:
            self._out.encode(array, self.done)
        except _AV_ERRORS as e:
            raise SinkError(f"writing {self._tmp()} failed ({_reason(e)}); check free disk space") from None
        self.done += 1
        self._in_segment += 1
        if self._in_segment == self.segment_frames:
            self.cut()

    def cut(self) -> None:
        """Finish the open segment (if a frame went into it), rename it into place and list it."""
        out, self._out = self._out, None
        if out is None:
            return
        tmp = self._tmp()
        segment = _Segment(self._next, self.done - self._in_segment, self._in_segment, self._discontinuity)
        self._in_segment = 0
        _finish(out, f"finishing HLS segment {tmp}", "; check free disk space")
        try:
            durable_replace(tmp, self.directory / segment.name)
        except OSError as e:
            raise SinkError(f"finishing HLS segment {self.directory / segment.name} failed ({e.strerror}); check free disk space") from None
        self._next, self._discontinuity = self._next + 1, False
        self.segments.append(segment)
        gone = self.segments[:-self.list_size] if self.list_size else []
        del self.segments[:len(gone)]
        self._discontinuities += sum(s.discontinuity for s in gone)
        self._write_playlist()
        for s in gone:
            if s.index >= self.list_size:
                (self.directory / _name(s.index - self.list_size)).unlink(missing_ok=True)

    def close(self) -> None:
        """Finish the open segment; end the playlist if every frame is done."""
        if self._closed:
            return
        self._closed = True
        self.cut()
        if self.frames is None or self.done == self.frames:
            self._ended = True
            self._write_playlist()
