"""Reading the user's video: its last frames on the output's frame rate, or all of it; bad files are one line."""

import bisect
import random
from fractions import Fraction

import av
import numpy as np
import pytest

from fifo_stream.errors import FifoStreamError, InputError
from fifo_stream.inputs import video
from fifo_stream.inputs.fit import fit_frame
from fifo_stream.inputs.video import VideoTail, iter_video, read_video_tail, video_grid_length
from media import write_tone

W, H = 64, 48


def frame(i):
    """Frame i: a 4x4 white square on black at x = i % 60, y = 4 * (i // 60)."""
    a = np.zeros((H, W, 3), np.uint8)
    x, y = i % 60, 4 * (i // 60)
    a[y : y + 4, x : x + 4] = 255
    return a


def index(rgb):
    """Which frame this is, from where its square is."""
    ys, xs = np.nonzero(rgb.min(axis=-1) > 128)
    return int(ys.min()) // 4 * 60 + int(xs.min())


def indices(frames):
    return [index(f) for f in frames]


def write_video(path, n, fps, fmt=None, codec="libx264", rotation=None, gop=None, audio_s=None):
    """n frames at fps; libx264 is lossless here (qp 0), so positions read back exactly.

    ``gop``: frames between keyframes; ``audio_s``: a silent audio track this long too.
    """
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = W, H
        stream.pix_fmt = "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        if audio_s:
            sound = out.add_stream("pcm_s16le" if fmt == "matroska" or str(path).endswith(".mkv") else "aac",
                                   rate=8000, layout="mono")
            silence = av.AudioFrame.from_ndarray(np.zeros((1, int(8000 * audio_s)), np.int16), format="s16", layout="mono")
            silence.sample_rate, silence.pts = 8000, 0
            out.mux(sound.encode(silence))
            out.mux(sound.encode(None))
        if codec == "libx264":
            stream.options = {"qp": "0", "preset": "ultrafast"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(frame(i), format="rgb24")
            f.pts = i
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    return path


CONTAINERS = ["mp4", "mkv"]


@pytest.mark.parametrize("ext", CONTAINERS)
def test_matching_rate_is_the_last_frames(tmp_path, ext):
    path = write_video(tmp_path / f"clip.{ext}", 20, 8)
    tail = read_video_tail(path, 6, 8, W, H)
    assert isinstance(tail, VideoTail)
    assert tail.frames.shape == (6, H, W, 3) and tail.frames.dtype == np.uint8
    assert indices(tail.frames) == [14, 15, 16, 17, 18, 19]
    assert np.array_equal(tail.frames, np.stack([frame(i) for i in range(14, 20)]))
    assert (tail.source_fps, tail.resampled, tail.padded) == (8.0, False, 0)


@pytest.mark.parametrize("ext", CONTAINERS)
def test_24_to_8_fps_is_every_third_frame_ending_at_the_last(tmp_path, ext):
    path = write_video(tmp_path / f"clip.{ext}", 60, 24)
    tail = read_video_tail(path, 5, 8, W, H)
    assert indices(tail.frames) == [47, 50, 53, 56, 59]
    assert tail.source_fps == pytest.approx(24) and tail.resampled and tail.padded == 0


def test_a_rate_within_one_percent_is_not_resampled(tmp_path):
    path = write_video(tmp_path / "clip.mkv", 60, 24)
    tail = read_video_tail(path, 5, 23.9, W, H)
    assert indices(tail.frames) == [55, 56, 57, 58, 59] and not tail.resampled
    assert read_video_tail(path, 5, 24.3, W, H).resampled  # 1.25% off


def test_8_to_24_fps_repeats_frames(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 20, 8)
    tail = read_video_tail(path, 7, 24, W, H)
    # t_last = 19/8; t_last - j/24 for j = 6..0 falls on frames 17, 17, 17, 18, 18, 18, 19
    assert indices(tail.frames) == [17, 17, 17, 18, 18, 18, 19]
    assert tail.resampled and tail.source_fps == 8.0


def test_frames_are_fitted(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 20, 8)
    for mode, size in [("crop", (32, 48)), ("pad", (64, 64)), ("stretch", (20, 30))]:
        tail = read_video_tail(path, 3, 8, *size, fit=mode)
        assert tail.frames.shape == (3, size[1], size[0], 3)
        for got, i in zip(tail.frames, [17, 18, 19]):
            assert np.array_equal(got, fit_frame(frame(i), *size, mode))


def test_rotation_in_the_file_is_applied(tmp_path):
    path = write_video(tmp_path / "phone.mp4", 10, 8, rotation=90)
    tail = read_video_tail(path, 2, 8, H, W)  # shown upright, the video is 48 wide and 64 high
    assert np.array_equal(tail.frames, np.stack([np.rot90(frame(i)) for i in (8, 9)]))
    first = next(iter_video(path, 8, H, W))
    assert np.array_equal(first, np.rot90(frame(0)))


def test_too_short(tmp_path):
    path = write_video(tmp_path / "short.mp4", 5, 8)
    with pytest.raises(InputError) as info:
        read_video_tail(path, 8, 8, W, H)
    assert_one_line(info.value, path)
    assert ("has 5 frames at 8 fps; it needs at least 8: use a longer video or pass --pad-short "
            "to repeat its last frame") in str(info.value)
    tail = read_video_tail(path, 8, 8, W, H, pad_short=True)
    assert indices(tail.frames) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert tail.padded == 3 and not tail.resampled


def test_too_short_on_the_resampled_grid(tmp_path):
    path = write_video(tmp_path / "short.mkv", 10, 24)  # frames 9, 6, 3, 0 lie on the 8 fps grid
    with pytest.raises(InputError, match="has 4 frames at 8 fps; it needs at least 5"):
        read_video_tail(path, 5, 8, W, H)
    tail = read_video_tail(path, 5, 8, W, H, pad_short=True)
    assert indices(tail.frames) == [0, 3, 6, 9, 9] and tail.padded == 1 and tail.resampled


def test_a_single_frame_video(tmp_path):
    path = write_video(tmp_path / "one.mkv", 1, 8)
    with pytest.raises(InputError, match="has 1 frame at 8 fps"):
        read_video_tail(path, 2, 8, W, H)
    assert read_video_tail(path, 1, 8, W, H).frames.shape == (1, H, W, 3)


def test_a_long_video_keeps_a_small_window(tmp_path):
    path = write_video(tmp_path / "long.mkv", 400, 24)
    # Every third frame for 4 frames spans 10 input frames; one before, one just pushed.
    tail = video._decode_tail(path, 4, 8, seek=False)
    assert tail.decoded == 400  # all of it went through the window
    assert tail.peak <= 3 * 3 + 2
    assert tail.available == 4
    assert [index(f.to_ndarray(format="rgb24")) for f in tail.frames] == [390, 393, 396, 399]
    assert video._decode_tail(path, 4, 24, seek=False).peak <= 4 + 2  # the same rate: the last frames and two


@pytest.mark.parametrize("ext", CONTAINERS)
def test_a_long_video_is_read_from_near_its_end(tmp_path, ext):
    path = write_video(tmp_path / f"long.{ext}", 400, 24, gop=24)  # 16.6 s, a keyframe every second
    for count, fps in [(4, 8), (5, 24), (30, 8)]:
        fast, slow = video._decode_tail(path, count, fps), video._decode_tail(path, count, fps, seek=False)
        assert slow.decoded == 400 and fast.decoded < 400 / 2
        assert [index(f.to_ndarray(format="rgb24")) for f in fast.frames] == \
               [index(f.to_ndarray(format="rgb24")) for f in slow.frames]
        assert (fast.available, fast.source_fps) == (slow.available, slow.source_fps)
    assert indices(read_video_tail(path, 4, 8, W, H).frames) == [390, 393, 396, 399]


def test_seeking_falls_back_to_the_start_when_the_end_is_wrong(tmp_path):
    # The audio runs 40 s, the video 10 s; for a tail longer than the last second, reading
    # from the last keyframe is not enough, so it reads the whole video.
    path = write_video(tmp_path / "long.mkv", 240, 24, gop=24, audio_s=40)
    tail = video._decode_tail(path, 40, 24)
    assert [index(f.to_ndarray(format="rgb24")) for f in tail.frames] == list(range(200, 240))
    assert tail.decoded >= 240
    assert indices(read_video_tail(path, 10, 8, W, H).frames) == list(range(212, 240, 3))


def test_the_window_bound_and_choice_on_irregular_timestamps():
    rng = random.Random(0)
    for trial in range(30):
        count, fps = rng.randint(1, 12), rng.choice([8, 10, 24, 7.5])
        times, t = [], rng.random()
        for _ in range(rng.randint(1, 400)):
            times.append(t)
            t += rng.choice([0, 1 / 30, 1 / 24, 1 / 8, 0.5, 0.0001])
        window = video._TailWindow(count, fps)
        for i, time in enumerate(times):
            window.push(time, i)
        # What the rule asks for, over all frames.
        last, tol = times[-1], 0.01 / fps
        want = []
        for k in range(count):
            target = last - (count - 1 - k) / fps
            if target < times[0] - tol:
                continue  # before the video: not available
            want.append(max(bisect.bisect_right(times, target + tol) - 1, 0))
        assert window.on_grid() == want, (trial, count, fps)
        assert window.last_frames() == list(range(len(times)))[-count:]
        # Never more than the frames within the grid's span, one before it and the last count.
        densest = max(bisect.bisect_right(times, x + (count - 1) / fps + tol) - bisect.bisect_left(times, x)
                      for x in times)
        assert window.peak <= max(densest + 2, count + 1)


def test_iter_video_resamples_from_the_first_frame(tmp_path):
    path = write_video(tmp_path / "clip.mkv", 60, 24)
    assert indices(iter_video(path, 8, W, H)) == list(range(0, 60, 3))
    assert indices(iter_video(path, 24, W, H)) == list(range(60))
    short = write_video(tmp_path / "clip.mp4", 20, 8)
    frames = list(iter_video(short, 24, W, H))
    assert indices(frames) == [k // 3 for k in range(58)]  # up to the last frame's time, 19/8 = 57/24
    assert len({id(f) for f in frames}) == len(frames)  # each a new array
    padded = list(iter_video(short, 24, 32, 32, fit="pad"))
    assert len(padded) == 58 and all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in padded)
    assert np.array_equal(padded[-1], fit_frame(frame(19), 32, 32, "pad"))


def test_iter_video_end_aligned_lays_the_grid_of_the_tail(tmp_path):
    path = write_video(tmp_path / "clip.mkv", 62, 24)
    assert indices(iter_video(path, 8, W, H)) == list(range(0, 61, 3))
    aligned = indices(iter_video(path, 8, W, H, end_aligned=True))
    assert aligned == list(range(1, 62, 3))  # ends on the last frame, as the continuation's base clip does
    assert aligned[-8:] == indices(read_video_tail(path, 8, 8, W, H).frames)
    assert indices(iter_video(path, 24, W, H, end_aligned=True)) == list(range(62))  # the same rate: one for one
    assert video_grid_length(path, 8) == len(aligned) and video_grid_length(path, 24) == 62


@pytest.mark.parametrize("fps", [5, 7.5, 8, 24, 30])
def test_video_grid_length_counts_iter_video_frames_without_fitting_them(tmp_path, fps):
    path = write_video(tmp_path / "clip.mkv", 37, 24)
    assert video_grid_length(path, fps) == len(list(iter_video(path, fps, W, H))) == len(list(iter_video(path, fps, W, H, end_aligned=True)))


def test_a_cut_off_recording_is_read_up_to_where_it_ends(tmp_path):
    path = write_video(tmp_path / "cut.mkv", 60, 8, codec="ffv1")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    tail = read_video_tail(path, 4, 8, W, H)
    got = indices(tail.frames)
    assert got == list(range(got[0], got[0] + 4)) and 20 < got[-1] < 59


def write_undecodable(path):
    """A Matroska file whose video packets are garbage."""
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("ffv1", rate=8)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        out.start_encoding()
        for i in range(5):
            packet = av.Packet(b"garbage!" * 20)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 8)
            out.mux(packet)


def bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("a video of a cat\nnot really\n")
    (tmp_path / "text.mp4").write_text("not a video\n" * 50)
    (tmp_path / "garbage.mkv").write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "folder.mp4").mkdir()
    write_tone(tmp_path / "sound.wav")
    write_tone(tmp_path / "sound.m4a", "mp4")
    write_undecodable(tmp_path / "broken.mkv")
    return {
        "missing": (tmp_path / "missing.mp4", "does not exist"),
        "directory": (tmp_path / "folder.mp4", "is a directory"),
        "empty": (tmp_path / "empty.mp4", "is empty"),
        "text": (tmp_path / "notes.txt", "FFmpeg"),
        "text named mp4": (tmp_path / "text.mp4", "FFmpeg"),
        "garbage": (tmp_path / "garbage.mkv", "FFmpeg"),
        "wav": (tmp_path / "sound.wav", "no video stream (only audio)"),
        "m4a": (tmp_path / "sound.m4a", "no video stream (only audio)"),
        "no decodable frame": (tmp_path / "broken.mkv", "no frame that can be decoded"),
    }


def assert_one_line(error, path):
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    assert isinstance(error, FifoStreamError)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


CASES = ["missing", "directory", "empty", "text", "text named mp4", "garbage", "wav", "m4a", "no decodable frame"]


@pytest.mark.parametrize("case", CASES)
def test_bad_files_are_one_line(tmp_path, case):
    path, phrase = bad_files(tmp_path)[case]
    for read in (lambda: read_video_tail(path, 2, 8, W, H, pad_short=True), lambda: next(iter_video(path, 8, W, H))):
        with pytest.raises(InputError) as info:
            read()
        assert_one_line(info.value, path)
        assert phrase in str(info.value)


def test_iter_video_checks_the_file_when_called(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        iter_video(tmp_path / "missing.mp4", 8, W, H)  # before any next()
    write_tone(tmp_path / "sound.wav")
    with pytest.raises(InputError, match="no video stream"):
        iter_video(tmp_path / "sound.wav", 8, W, H)


@pytest.mark.parametrize(("count", "fps", "fit"), [(0, 8, "crop"), (2, 0, "crop"), (2, float("nan"), "crop"), (2, 8, "zoom")])
def test_bad_arguments(tmp_path, count, fps, fit):
    path = write_video(tmp_path / "clip.mp4", 4, 8)
    with pytest.raises(ValueError):
        read_video_tail(path, count, fps, W, H, fit=fit)
