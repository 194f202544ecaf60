"""Fitting pictures to the video size: crop, pad, stretch."""

import numpy as np
import pytest

from fifo_stream.inputs.fit import FIT_MODES, fit_frame


def ramp(height, width):
    """A picture whose every pixel differs from its neighbours (red = x, green = y, blue = x + y)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def square(height, width, top, left, size):
    """A white square on black."""
    a = np.zeros((height, width, 3), np.uint8)
    a[top : top + size, left : left + size] = 255
    return a


@pytest.mark.parametrize("mode", FIT_MODES)
def test_same_size_is_an_equal_copy(mode):
    src = ramp(48, 64)
    out = fit_frame(src, 64, 48, mode)
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    assert np.array_equal(out, src)
    assert not np.shares_memory(out, src)


def test_crop_without_scaling_keeps_the_center_exactly():
    src = ramp(100, 200)
    assert np.array_equal(fit_frame(src, 100, 100, "crop"), src[:, 50:150])
    tall = ramp(200, 100)
    assert np.array_equal(fit_frame(tall, 100, 100, "crop"), tall[50:150])


def test_crop_scales_to_cover_and_keeps_the_center():
    src = square(100, 200, 30, 80, 40)  # a 40x40 square in the middle
    src[:, :10] = 255  # a bar at the left edge, which the crop cuts off
    out = fit_frame(src, 50, 50, "crop")  # covers at half size: 100x50, crop 50 of its width
    assert out.shape == (50, 50, 3)
    assert (out[16:34, 16:34] == 255).all()  # the square, 20x20 around the center
    inside = np.zeros((50, 50), bool)
    inside[14:36, 14:36] = True
    assert (out[~inside] == 0).all()  # everything else black: the left bar is gone


def test_crop_upscales_a_small_picture():
    src = square(10, 20, 3, 8, 4)
    out = fit_frame(src, 40, 40, "crop")  # scale 4: the middle 10x10 becomes 40x40
    assert out.shape == (40, 40, 3)
    ys, xs = np.nonzero(out[..., 0] > 128)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (12, 27, 12, 27)


def test_pad_leaves_black_bars_of_the_right_size():
    wide = np.full((100, 200, 3), 255, np.uint8)
    out = fit_frame(wide, 100, 100, "pad")  # 100x50 in the middle, 25 rows above and below
    assert (out[:25] == 0).all() and (out[75:] == 0).all()
    assert (out[25:75] == 255).all()
    tall = np.full((200, 100, 3), 255, np.uint8)
    out = fit_frame(tall, 100, 100, "pad")
    assert (out[:, :25] == 0).all() and (out[:, 75:] == 0).all()
    assert (out[:, 25:75] == 255).all()


def test_pad_with_an_odd_bar():
    src = np.full((30, 90, 3), 200, np.uint8)  # 3:1 into 64x48: 64x21, bars of 13 and 14 rows
    out = fit_frame(src, 64, 48, "pad")
    rows = np.nonzero((out == 200).all(axis=(1, 2)))[0]
    assert (rows.min(), rows.max()) == (13, 33)
    assert (out[:13] == 0).all() and (out[34:] == 0).all()


def test_pad_keeps_the_aspect_ratio_of_the_content():
    src = square(100, 200, 30, 80, 40)
    out = fit_frame(src, 100, 100, "pad")  # half size: the square is 20x20, centered
    ys, xs = np.nonzero(out[..., 0] > 128)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (40, 59, 40, 59)


def test_stretch_fills_the_frame_ignoring_aspect():
    src = np.zeros((100, 200, 3), np.uint8)
    src[:, :100] = 255  # left half white
    out = fit_frame(src, 50, 80, "stretch")
    assert out.shape == (80, 50, 3)
    assert (out[:, :24] == 255).all() and (out[:, 26:] == 0).all()
    full = fit_frame(np.full((7, 300, 3), 90, np.uint8), 64, 48, "stretch")
    assert (full == 90).all()


@pytest.mark.parametrize("mode", FIT_MODES)
@pytest.mark.parametrize("size", [(31, 17), (64, 48), (640, 16), (5, 500)])
def test_a_flat_picture_stays_flat_after_rounding(mode, size):
    out = fit_frame(np.full((37, 53, 3), 123, np.uint8), *size, mode)
    assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
    assert set(np.unique(out)) <= ({0, 123} if mode == "pad" else {123})


def test_shrinking_is_antialiased():
    stripes = np.zeros((66, 66, 3), np.uint8)
    stripes[:, ::2] = 255
    # A third of the size: point sampling would hit the stripes' centres and keep them at
    # 0 and 255; the antialiasing filter averages them to grey.
    out = fit_frame(stripes, 22, 22, "stretch").astype(int)
    assert np.abs(out - 128).max() <= 20


def test_read_only_and_strided_input():
    src = ramp(48, 64)
    src.flags.writeable = False
    assert np.array_equal(fit_frame(src[:, ::-1], 64, 48, "crop"), ramp(48, 64)[:, ::-1])
    assert fit_frame(src, 32, 24, "pad").shape == (24, 32, 3)


@pytest.mark.parametrize(
    "args",
    [
        (np.zeros((4, 4, 3), np.float32), 8, 8, "crop"),
        (np.zeros((4, 4), np.uint8), 8, 8, "crop"),
        (np.zeros((0, 4, 3), np.uint8), 8, 8, "crop"),
        (np.zeros((4, 4, 3), np.uint8), 0, 8, "crop"),
        (np.zeros((4, 4, 3), np.uint8), 8, 8, "zoom"),
    ],
)
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        fit_frame(*args)
