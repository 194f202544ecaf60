"""Reading the user's video: its last frames to continue from, or all of it, on the output's frame rate.

Both readers put the video on a time grid of the requested ``fps``. Each grid time takes the
latest input frame shown at or before it (within 1% of an output frame interval), or the
first frame when none is. ``read_video_tail`` lays the grid backwards from the video's last
frame, ``iter_video`` forwards from its first. When the video's own rate is within 1% of
``fps`` there is no resampling: the frames are taken one for one.

Decoding streams through the file: the tail keeps only the frames its grid can still
need, so memory does not grow with the video's length, and in a long video it starts from
a keyframe shortly before the end (falling back to the start when that cannot be shown to
give the same frames). Packets that cannot be decoded are skipped and a file that ends
early (a recording that was cut off) is read up to where it ends; a video with no
decodable frame at all is refused.
"""

from __future__ import annotations

import bisect
import math
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from ..errors import InputError
from .fit import FIT_MODES, fit_frame
from .image import _AV_ERRORS, check_file, frame_to_rgb, only_streams, open_media

VIDEO_KINDS = "a video file such as MP4, MKV or WebM"

# Rates this close (relative) count as the same; grid times this close (in output frame
# intervals) count as the same instant.
RATE_TOLERANCE = 0.01
TIME_TOLERANCE = 0.01


@dataclass
class VideoTail:
    """The last frames of the user's video, fitted to the output's size, to continue from."""

    frames: np.ndarray  # (count, height, width, 3) uint8, fitted, oldest first
    source_fps: float  # the input's frame rate
    resampled: bool  # True when source_fps differs from the requested fps (by more than 1%)
    padded: int  # how many copies of the last frame were appended (pad_short)


def read_video_tail(path: str | os.PathLike, count: int, fps: float, width: int, height: int,
                    fit: str = "crop", pad_short: bool = False) -> VideoTail:
    """The last ``count`` frames of the video in ``path``, on a grid of ``fps``, fitted to width x height.

    Grid time k (0 = oldest) is ``t_last - (count - 1 - k) / fps``, where ``t_last`` is the
    time of the video's last frame, so the last frame returned is always the video's last
    frame. From 24 fps to 8 fps that is every third frame, ending with the last one; from
    8 fps to 24 fps each frame appears three times. Only grid times at or after the video's
    first frame count as available: with fewer than ``count`` of them this is an InputError,
    or, with ``pad_short``, the available frames followed by copies of the last one
    (``padded`` says how many).

    Raises InputError (one line, naming the path) for a missing file, a directory, an empty
    file, one FFmpeg cannot read, one without a video stream, one without a decodable frame,
    and a video that is too short. Raises ValueError for a count, fps, size or fit mode that
    cannot be used.
    """
    _check_args(fps, width, height, fit)
    if int(count) != count or count < 1:
        raise ValueError(f"count must be a positive whole number, got {count}")
    count = int(count)
    tail = _decode_tail(path, count, fps)
    if tail.available < count and not pad_short:
        raise InputError(
            f"video {tail.name} has {_frames(tail.available)} at {fps:g} fps; it needs at least {count}: "
            "use a longer video or pass --pad-short to repeat its last frame"
        )
    fitted: dict[int, np.ndarray] = {}
    frames = np.empty((count, height, width, 3), np.uint8)
    for k, frame in enumerate(tail.frames):
        if id(frame) not in fitted:
            fitted[id(frame)] = fit_frame(frame_to_rgb(frame), width, height, fit)
        frames[k] = fitted[id(frame)]
    padded = count - len(tail.frames)
    frames[len(tail.frames):] = frames[len(tail.frames) - 1]
    return VideoTail(frames=frames, source_fps=tail.source_fps, resampled=not _same_rate(tail.source_fps, fps),
                     padded=padded)


def iter_video(path: str | os.PathLike, fps: float, width: int, height: int, fit: str = "crop",
               end_aligned: bool = False) -> Iterator[np.ndarray]:
    """Every frame of the video in ``path`` on a grid of ``fps`` from its first frame, fitted to width x height.

    Grid time k is ``t_first + k / fps`` for every k up to the video's last frame; each
    array is a new uint8 (height, width, 3). With ``end_aligned`` the grid is laid back from
    the last frame instead, as ``read_video_tail`` lays it (so the last frame is the video's
    last, and the grid continues into frames generated after the tail); when resampling,
    that reads the file once more first. The file is checked and opened when this is
    called (so a bad file fails here, before the first frame is asked for), except that a
    video with no decodable frame fails on the first ``next()``. Same InputErrors as
    ``read_video_tail``.
    """
    _check_args(fps, width, height, fit)
    name = check_file(path, "video", VIDEO_KINDS)
    with open_media(name, "video", VIDEO_KINDS) as container:
        rate = _header_rate(_video_stream(container, name))
    return _iter_video(name, fps, width, height, fit, rate, end_aligned)


def video_grid_length(path: str | os.PathLike, fps: float) -> int:
    """How many frames ``iter_video`` gives for ``path`` at ``fps`` (either alignment), from the
    frame times alone: it decodes the video but converts and fits no frame. Same InputErrors."""
    name = check_file(path, "video", VIDEO_KINDS)
    with open_media(name, "video", VIDEO_KINDS) as container:
        rate = _header_rate(_video_stream(container, name))
    times = _frame_times(name)
    if rate is not None and _same_rate(rate, fps):
        return len(times)
    return _grid_steps(times, fps) + 1


def _frame_times(name: str) -> list[float]:
    """The time of every decodable frame of the video ``name``, in display order."""
    with open_media(name, "video", VIDEO_KINDS) as container:
        return [time for time, _ in _decoded(container, _video_stream(container, name), name)]


def _grid_steps(times: list[float], fps: float) -> int:
    """How many grid steps of ``fps`` fit between the first and the last frame."""
    return math.floor((times[-1] - times[0]) * fps + TIME_TOLERANCE)


def _iter_video(name: str, fps: float, width: int, height: int, fit: str, rate: float | None,
                end_aligned: bool) -> Iterator[np.ndarray]:
    tolerance = TIME_TOLERANCE / fps
    origin = None
    if end_aligned and not (rate is not None and _same_rate(rate, fps)):
        times = _frame_times(name)
        origin = times[-1] - _grid_steps(times, fps) / fps
    with open_media(name, "video", VIDEO_KINDS) as container:
        frames = _decoded(container, _video_stream(container, name), name)
        if rate is not None and _same_rate(rate, fps):
            for _, frame in frames:
                yield fit_frame(frame_to_rgb(frame), width, height, fit)
            return
        start, k, held, time = origin, 0, None, 0.0
        for time, frame in frames:
            if start is None:
                start = time
            # Grid times before this frame belong to the one held before it.
            while held is not None and start + k / fps < time - tolerance:
                yield held.copy()
                k += 1
            held = fit_frame(frame_to_rgb(frame), width, height, fit)
        while held is not None and start + k / fps <= time + tolerance:
            yield held.copy()
            k += 1


class _TailWindow:
    """The decoded frames a tail of ``count`` frames on a grid of ``fps`` can still need.

    ``push`` frames in order. The grid ends at the last frame, which is not known until the
    end, but its first time is at least (latest time - span), so a frame whose successor is
    already at or before that bound can never be chosen and is dropped. The last ``count``
    frames are always kept too (for a rate that matches). ``peak`` is the most frames held.
    """

    def __init__(self, count: int, fps: float) -> None:
        self.count, self.fps = count, fps
        self.span = (count - 1) / fps
        self.tolerance = TIME_TOLERANCE / fps
        self.items: deque[tuple[float, object]] = deque()
        self.first: float | None = None
        self.seen = 0
        self.peak = 0

    def push(self, time: float, item: object) -> None:
        if self.first is None:
            self.first = time
        self.items.append((time, item))
        self.seen += 1
        bound = time - self.span - self.tolerance
        while len(self.items) > self.count and self.items[1][0] <= bound:
            self.items.popleft()
        self.peak = max(self.peak, len(self.items))

    def last_frames(self) -> list:
        return [item for _, item in list(self.items)[-self.count:]]

    def on_grid(self) -> list:
        """The frames for the grid times at or after the first frame, oldest first (at most count)."""
        last = self.items[-1][0]
        available = min(self.count, math.floor((last - self.first) * self.fps + TIME_TOLERANCE) + 1)
        times = [t for t, _ in self.items]
        chosen = []
        for j in range(available - 1, -1, -1):
            i = bisect.bisect_right(times, last - j / self.fps + self.tolerance) - 1
            chosen.append(self.items[max(i, 0)][1])
        return chosen


@dataclass
class _Tail:
    name: str
    frames: list  # av.VideoFrame, oldest first, at most count (one object may repeat)
    available: int  # how many grid frames the video has (at most count)
    source_fps: float
    peak: int  # the most decoded frames held at once
    decoded: int  # how many frames were decoded (fewer than the video has when it could seek)


# A long video is first read from a keyframe this far before the tail (a container's
# duration can be a little off); the video is read from its start only when that fails.
SEEK_MARGIN_S = 2.0
SEEK_MIN_S = 5.0  # nor is it worth seeking into a video shorter than this


def _decode_tail(path: str | os.PathLike, count: int, fps: float, seek: bool = True) -> _Tail:
    """The frames the tail is made of, still decoded (not converted or fitted).

    With ``seek``, a long video is read only from a keyframe shortly before its tail. The
    result is kept only if it is provably the same as reading everything: it holds at least
    ``count`` frames and its first frame is at or before the grid's first time (so that no
    frame the grid could take lies before it). Otherwise the video is read from its start.
    """
    name = check_file(path, "video", VIDEO_KINDS)
    window, rate, decoded = None, None, 0
    if seek:
        window, rate, decoded = _read_window(name, count, fps, from_end=True)
        if window is not None and not (
            window.seen >= count and window.first <= window.items[-1][0] - window.span + window.tolerance
        ):
            window = None
    if window is None:
        window, rate, more = _read_window(name, count, fps, from_end=False)
        decoded += more
    if rate is None:
        # No rate in the file: the mean rate of its timestamps, or fps for a single frame.
        first, last = window.first, window.items[-1][0]
        rate = (window.seen - 1) / (last - first) if last > first else float(fps)
    frames = window.last_frames() if _same_rate(rate, fps) else window.on_grid()
    return _Tail(name=name, frames=frames, available=len(frames), source_fps=rate, peak=window.peak, decoded=decoded)


def _read_window(name: str, count: int, fps: float, from_end: bool) -> tuple[_TailWindow | None, float | None, int]:
    """The tail window of the whole video, or (``from_end``) of its end; None if it could not seek there."""
    with open_media(name, "video", VIDEO_KINDS) as container:
        stream = _video_stream(container, name)
        rate = _header_rate(stream)
        window = _TailWindow(count, fps)
        if from_end:
            end = _end_time(container, stream)
            if end is None or end < SEEK_MIN_S + window.span + SEEK_MARGIN_S:
                return None, rate, 0
            try:
                container.seek(int((end - window.span - SEEK_MARGIN_S) * av.time_base), backward=True)
            except _AV_ERRORS:
                return None, rate, 0
        try:
            for time, frame in _decoded(container, stream, name):
                window.push(time, frame)
        except InputError:
            if not from_end:
                raise
            return None, rate, window.seen
        return window, rate, window.seen


def _end_time(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """When the video ends, in seconds from the file's time zero, as the file says (may be off)."""
    if stream.duration is not None and stream.time_base is not None:
        return float((stream.duration + (stream.start_time or 0)) * stream.time_base)
    if container.duration is not None:
        return (container.duration + (container.start_time or 0)) / av.time_base
    return None


def _decoded(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
             name: str) -> Iterator[tuple[float, av.VideoFrame]]:
    """(time in seconds, frame) for every decodable frame, in display order; times never go back."""
    rate = _header_rate(stream)
    stream.thread_type = "AUTO"  # frame and slice threads: a long video decodes faster
    count, time = 0, None
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except _AV_ERRORS:
                continue  # a damaged packet: skip it, as players do
            for frame in frames:
                if frame.pts is not None and frame.time is not None:
                    stamp = float(frame.time)
                else:
                    stamp = 0.0 if time is None else time + 1 / (rate or 25)
                time = stamp if time is None else max(time, stamp)
                count += 1
                yield time, frame
    except _AV_ERRORS:
        pass  # the file ends early (cut off): what was read is the video
    if count == 0:
        raise InputError(f"video {name} has no frame that can be decoded; re-export or re-download it")


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.stream.VideoStream:
    """The video stream, not counting cover art (an attached picture in a music file)."""
    streams = [s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
    if not streams:
        raise InputError(f"video {name} has no video stream{only_streams(container)}; give {VIDEO_KINDS}")
    return streams[0]


def _header_rate(stream: av.video.stream.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return None


def _frames(n: int) -> str:
    return "1 frame" if n == 1 else f"{n} frames"


def _same_rate(a: float, b: float) -> bool:
    return abs(a - b) <= RATE_TOLERANCE * b


def _check_args(fps: float, width: int, height: int, fit: str) -> None:
    try:
        usable = math.isfinite(float(fps)) and float(fps) > 0
    except (TypeError, ValueError):
        usable = False
    if not usable:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if int(width) != width or int(height) != height or width <= 0 or height <= 0:
        raise ValueError(f"the frame size must be positive whole numbers, got {width}x{height}")
    if fit not in FIT_MODES:
        raise ValueError(f"fit mode must be one of {', '.join(FIT_MODES)}, got {fit!r}")
