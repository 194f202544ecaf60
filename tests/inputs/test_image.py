"""Reading the user's image; every bad file is one InputError line naming it."""

import struct
from fractions import Fraction

import av
import numpy as np
import pytest

from fifo_stream.errors import FifoStreamError, InputError
from fifo_stream.inputs import image
from fifo_stream.inputs.image import MAX_IMAGE_PIXELS, read_image
from media import write_tone


def picture(height=48, width=64, left=10, top=12):
    """A white 8x8 square on a dark blue background: its position says which picture it is."""
    a = np.zeros((height, width, 3), np.uint8)
    a[..., 2] = 60
    a[top : top + 8, left : left + 8] = 255
    return a


def square_at(rgb):
    """(top, left) of the white square."""
    ys, xs = np.nonzero(rgb.min(axis=-1) > 160)
    return int(ys.min()), int(xs.min())


def write(path, frames, fmt, codec, pix_fmt, rate=4, in_format="rgb24", rotation=None, options=None):
    """Encode RGB(A) frames into one file with PyAV; returns the path."""
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, options=options or {})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, a in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(a, format=in_format)
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def png(path, a, pix_fmt="rgb24", in_format="rgb24"):
    return write(path, [a], "image2", "png", pix_fmt, in_format=in_format)


def test_png_is_read_exactly(tmp_path):
    src = picture()
    out = read_image(png(tmp_path / "a.png", src))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    assert np.array_equal(out, src)


def test_path_objects_and_names_ffmpeg_would_misread(tmp_path):
    src = picture()
    data = png(tmp_path / "a.png", src).read_bytes()
    for name in ["frame%03d.png", "a:b.png", "pic.jpg"]:  # a pattern, a "protocol", a wrong extension
        (tmp_path / name).write_bytes(data)
        assert np.array_equal(read_image(tmp_path / name), src)
        assert np.array_equal(read_image(str(tmp_path / name)), src)


@pytest.mark.parametrize(("name", "fmt", "codec", "pix_fmt"), [
    ("a.jpg", "image2", "mjpeg", "yuvj444p"),
    ("a.webp", "webp", "libwebp", "yuv420p"),
])
def test_lossy_images(tmp_path, name, fmt, codec, pix_fmt):
    src = picture()
    out = read_image(write(tmp_path / name, [src], fmt, codec, pix_fmt, options={"quality": "95"} if "webp" in codec else None))
    assert out.shape == src.shape and out.dtype == np.uint8
    assert square_at(out) == (12, 10)
    assert np.abs(out.astype(int) - src).mean() < 6


def test_grey_and_transparent_pngs(tmp_path):
    grey = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64).astype(np.uint8)
    out = read_image(png(tmp_path / "grey.png", grey, "gray", "gray"))
    assert np.array_equal(out, np.repeat(grey[..., None], 3, axis=-1))

    rgba = np.zeros((300, 64, 4), np.uint8)  # taller than one compositing band
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :20, 3] = 255  # opaque
    rgba[:, 20:40, 3] = 0  # transparent: composited onto black
    rgba[:, 40:, 3] = 128  # half
    out = read_image(png(tmp_path / "alpha.png", rgba, "rgba", "rgba"))
    assert (out[:, :20] == (200, 100, 50)).all()
    assert (out[:, 20:40] == 0).all()
    assert (np.abs(out[:, 40:].astype(int) - (100, 50, 25)) <= 1).all()


@pytest.mark.parametrize(("name", "fmt", "codec", "pix_fmt"), [
    ("anim.gif", "gif", "gif", "rgb8"),
    ("anim.apng", "apng", "apng", "rgb24"),
])
def test_animated_image_gives_its_first_frame(tmp_path, name, fmt, codec, pix_fmt):
    frames = [picture(left=4 + 12 * i) for i in range(3)]
    path = write(tmp_path / name, frames, fmt, codec, pix_fmt)
    with av.open(str(path)) as c:  # the file really is animated
        assert [square_at(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)] == [(12, 4), (12, 16), (12, 28)]
    out = read_image(path)
    assert out.shape == (48, 64, 3)
    assert square_at(out) == (12, 4)
    if codec == "apng":
        assert np.array_equal(out, frames[0])


def test_animated_webp(tmp_path):
    frames = [picture(left=4 + 12 * i) for i in range(3)]
    path = write(tmp_path / "anim.webp", frames, "webp", "libwebp_anim", "yuv420p")
    try:
        out = read_image(path)
    except InputError as e:  # what FFmpeg 8 does: it has no decoder for animated WebP
        assert_one_line(e, path)
        assert "animated WebP" in str(e) and "PNG" in str(e)
    else:  # an FFmpeg that decodes it gives the first frame
        assert square_at(out) == (12, 4)


def test_rotation_in_the_file_is_applied(tmp_path):
    src = picture()
    path = write(tmp_path / "turned.mp4", [src], "mp4", "libx264", "yuv444p", rotation=90, options={"qp": "0"})
    out = read_image(path)
    assert out.shape == (64, 48, 3)
    assert np.abs(out.astype(int) - np.rot90(src)).max() <= 2  # shown turned a quarter counterclockwise


@pytest.mark.parametrize(("orientation", "turn"), [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_jpeg_exif_orientation_is_applied(tmp_path, orientation, turn):
    src = picture(left=0, top=0)  # the square in the top left corner
    jpeg = write(tmp_path / "plain.jpg", [src], "image2", "mjpeg", "yuvj444p").read_bytes()
    # An APP1 Exif segment right after SOI, with one IFD entry: Orientation (0x0112), SHORT.
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1, orientation) + struct.pack("<I", 0)
    app1 = b"Exif\x00\x00" + tiff
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:])
    out = read_image(path)
    want = np.rot90(src, k=turn)  # 6: turn clockwise to show it upright; 8: counterclockwise
    assert out.shape == want.shape
    assert square_at(out) == square_at(want)


def test_video_gives_its_first_frame(tmp_path):
    frames = [picture(left=4 + 12 * i) for i in range(3)]
    path = write(tmp_path / "clip.mkv", frames, "matroska", "ffv1", "bgr0", rate=Fraction(8))
    assert np.array_equal(read_image(path), frames[0])


def assert_one_line(error, path):
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    assert isinstance(error, FifoStreamError)


def bad_files(tmp_path):
    """name -> (path, a phrase the message must contain)."""
    good = tmp_path / "good.png"
    data = png(good, np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).read_bytes()
    jpeg = write(tmp_path / "good.jpg", [picture()], "image2", "mjpeg", "yuvj420p").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "header_only.png").write_bytes(data[:40])
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "notes.txt").write_text("a picture of a cat\nnot really\n")
    (tmp_path / "text.png").write_text("not a png\n" * 20)
    (tmp_path / "garbage.bin").write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    write_tone(tmp_path / "sound.wav")
    return {
        "missing": (tmp_path / "missing.png", "does not exist"),
        "directory": (tmp_path / "folder.png", "is a directory"),
        "empty": (tmp_path / "empty.png", "is empty"),
        "text": (tmp_path / "notes.txt", "FFmpeg"),
        "text named png": (tmp_path / "text.png", "not an image"),
        "garbage": (tmp_path / "garbage.bin", "FFmpeg"),
        "audio only": (tmp_path / "sound.wav", "only audio"),
        "truncated png": (tmp_path / "truncated.png", "damaged or truncated"),
        "header only png": (tmp_path / "header_only.png", "cannot be decoded"),
        "truncated jpeg": (tmp_path / "truncated.jpg", "damaged"),
    }


CASES = ["missing", "directory", "empty", "text", "text named png", "garbage", "audio only",
         "truncated png", "header only png", "truncated jpeg"]


@pytest.mark.parametrize("case", CASES)
def test_bad_files_are_one_line(tmp_path, case):
    path, phrase = bad_files(tmp_path)[case]
    with pytest.raises(InputError) as info:
        read_image(path)
    assert_one_line(info.value, path)
    assert phrase in str(info.value)
    error = info.value  # no chained traceback
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_the_limit_and_the_size_are_named(tmp_path, monkeypatch):
    assert MAX_IMAGE_PIXELS == 8192 * 8192
    path = png(tmp_path / "big.png", picture(150, 200))
    monkeypatch.setattr(image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(InputError) as info:
        read_image(path)
    assert_one_line(info.value, path)
    assert "is 200x150; images up to 10,000 pixels are read" in str(info.value)
    monkeypatch.setattr(image, "MAX_IMAGE_PIXELS", 200 * 150)
    assert read_image(path).shape == (150, 200, 3)


def test_the_size_is_checked_before_decoding(tmp_path, monkeypatch):
    # The top half of an 80x60 PNG: its header gives the stream's size, its data cannot be
    # decoded. Over the limit it is refused for its size, so no decoding was tried.
    data = png(tmp_path / "good.png", np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="is 80x60; images up to 1,000 pixels"):
        read_image(path)
