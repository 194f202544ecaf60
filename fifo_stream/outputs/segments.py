"""Resumable file outputs: segments finished at every cut, joined into one file by stream copy."""

from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np

from ..durable import durable_replace
from .base import _AV_ERRORS, Sink, SinkError, _make_dir, _reason
from .file import FileSink
from .formats import file_format


def find_segments(directory: str | os.PathLike, stem: str, ext: str) -> list[Path]:
    """Finished segments ``stem.NNNNN.ext`` in ``directory``, in index order."""
    ext = ext if ext.startswith(".") else "." + ext
    pattern = re.compile(re.escape(stem) + r"\.(\d{5,})" + re.escape(ext) + "$")
    found = [(int(m.group(1)), p) for p in Path(directory).glob(f"{stem}.*{ext}") if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


class SegmentWriter(Sink):
    """Writes frames into segment files ``stem.NNNNN.ext`` that are finished by ``cut()``.

    The open segment is ``stem.NNNNN.ext.partial`` (itself crash-tolerant). Numbering starts
    at ``index``, by default one past the highest finished segment already in ``directory``.
    Other keyword arguments go to ``FileSink``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        stem: str,
        ext: str,
        width: int,
        height: int,
        fps: float,
        *,
        index: int | None = None,
        **file_options,
    ) -> None:
        self.directory = Path(directory)
        self.stem = stem
        self.ext = ext if ext.startswith(".") else "." + ext
        file_format(self.ext, what="segment")
        self.width, self.height, self.fps = width, height, fps
        self.file_options = file_options
        _make_dir(self.directory, "segment")
        if index is None:
            existing = find_segments(self.directory, stem, self.ext)
            index = int(existing[-1].name[len(stem) + 1:-len(self.ext)]) + 1 if existing else 0
        self.index = index
        self._sink: FileSink | None = None

    def segment_path(self, index: int) -> Path:
        """The finished path of segment ``index``."""
        return self.directory / f"{self.stem}.{index:05d}{self.ext}"

    @property
    def frames_in_segment(self) -> int:
        """Frames written to the open segment."""
        return self._sink.frames if self._sink else 0

    def write(self, frame: np.ndarray) -> None:
        if self._sink is None:
            partial = self.segment_path(self.index).with_name(self.segment_path(self.index).name + ".partial")
            self._sink = FileSink(partial, self.width, self.height, self.fps, ext=self.ext, **self.file_options)
        self._sink.write(frame)

    def cut(self) -> Path | None:
        """Finish the open segment: close, fsync, rename to its final name, fsync the directory.

        Returns the finished path, or None when no frame was written since the last cut.
        """
        sink, self._sink = self._sink, None
        if sink is None:
            return None
        sink.close()
        final = self.segment_path(self.index)
        try:
            durable_replace(sink.path, final)
        except OSError as e:
            raise SinkError(f"finishing segment {final} failed ({e.strerror}); check free disk space") from None
        self.index += 1
        return final

    def close(self) -> None:
        """Finish the open segment, if any."""
        self.cut()


def _decode_order_pts(path: str | os.PathLike) -> list[int]:
    with av.open(str(path)) as src:
        if not src.streams.video:
            raise SinkError(f"segment {path} has no video stream; remove it from the list")
        return [p.pts for p in src.demux(src.streams.video[0]) if p.pts is not None]


def count_frames(path: str | os.PathLike) -> int:
    """The frames in a video file, counted as its video packets (read back, not trusted)."""
    try:
        return len(_decode_order_pts(path))
    except _AV_ERRORS as e:
        raise SinkError(f"cannot read {path} back ({_reason(e)})") from None


def _reorder_depth(pts: list[int]) -> int:
    """How many frames decode order runs ahead of presentation order at most."""
    rank = {value: r for r, value in enumerate(sorted(pts))}
    return max([k - rank[value] for k, value in enumerate(pts)], default=0)


def _copy_packets(src, istream, dst, ostream, pts: list[int], delay: int, offset: Fraction) -> Fraction:
    """Mux one segment's packets into ``dst``, starting ``offset`` seconds in; returns the segment's length in seconds.

    Matroska stores no dts, so decode timestamps are rebuilt from presentation order:
    dts_k = (k - delay)-th smallest pts, with one delay for all segments so that dts
    keep increasing across the joins.
    """
    tb = istream.time_base
    step = 1 / (istream.average_rate or istream.guessed_rate or istream.base_rate)
    shift = round(offset / tb)
    ordered = sorted(pts)
    packets = (p for p in src.demux(istream) if p.pts is not None)
    for k, packet in enumerate(packets):
        dts = ordered[k - delay] if k >= delay else ordered[0] - round((delay - k) * step / tb)
        packet.pts += shift
        packet.dts = dts + shift
        packet.stream = ostream
        dst.mux(packet)
    return (ordered[-1] * tb + step) if ordered else 0


def _copy_segments(dst, segments: Sequence[str | os.PathLike], orders: list[list[int]], delay: int, out: Path) -> None:
    """Mux the segments into ``dst`` one after the other, each one's timestamps following the last's."""
    ostream = first = None
    offset = Fraction(0)  # start of the current segment, in seconds
    for segment, pts in zip(segments, orders):
        with av.open(str(segment)) as src:
            istream = src.streams.video[0]
            kind = (istream.codec_context.name, istream.width, istream.height)
            if ostream is None:
                try:
                    ostream = dst.add_stream_from_template(istream)
                except ValueError:
                    raise SinkError(f"{out.suffix} cannot hold {kind[0]} video; join into {Path(segment).suffix} instead") from None
                first = kind
            elif kind != first:
                raise SinkError(f"segment {segment} differs in codec or frame size from the first; join only segments of one run")
            offset += _copy_packets(src, istream, dst, ostream, pts, delay, offset)


def join_segments(segments: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Concatenate video segments into ``out`` by stream copy (no re-encode), with continuous timestamps.

    Segments must share codec and frame size. The result is written under a temporary
    name and renamed into place; its container follows ``out``'s extension.
    """
    out = Path(out)
    if not segments:
        raise SinkError(f"no segments to join into {out}; write some frames first")
    fmt = file_format(out.suffix, where=out)
    tmp = out.with_name(f".{out.name}.joining")
    options = {"movflags": "+faststart"} if fmt.name == "mp4" else {}
    try:
        orders = [_decode_order_pts(segment) for segment in segments]
        delay = max(_reorder_depth(pts) for pts in orders)
        with av.open(str(tmp), "w", format=fmt.name, container_options=options) as dst:
            _copy_segments(dst, segments, orders, delay, out)
        durable_replace(tmp, out)
    except SinkError:
        tmp.unlink(missing_ok=True)
        raise
    except _AV_ERRORS as e:
        tmp.unlink(missing_ok=True)
        raise SinkError(f"joining segments into {out} failed ({_reason(e)}); check that every segment is a finished video file") from None
    return out
