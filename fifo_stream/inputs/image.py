"""Reading the user's image (PNG, JPEG, WebP, or anything else FFmpeg decodes as a picture).

Also the checks and the opening that reading a video shares: every problem with the file is
an ``InputError`` with a one-line message that names the file, says what is wrong and what
to do about it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

import av
import numpy as np

from ..errors import InputError

MAX_IMAGE_PIXELS = 8192 * 8192

IMAGE_KINDS = "a PNG, JPEG or WebP image"

# What PyAV raises for a file it cannot open, demux or decode (its errors subclass these).
_AV_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The picture in ``path`` as a new RGB uint8 array of shape (H, W, 3).

    Any file FFmpeg decodes as a picture works: PNG, JPEG, WebP, BMP, TIFF, GIF, ... An
    animated image (GIF, APNG) gives its FIRST frame, as the decoder composes it (the whole
    canvas after the first frame is drawn); a video file likewise gives its first frame.
    Animated WebP cannot be decoded by FFmpeg and is refused with advice. Transparent
    pixels are composited onto black; a rotation recorded in the file (a display matrix,
    e.g. from EXIF orientation where FFmpeg exports it) is applied.

    The size is checked against ``MAX_IMAGE_PIXELS`` from the stream's width and height
    before the picture is decoded and converted (FFmpeg itself decodes the first frame once
    while opening the file, to learn its format), and again on the decoded frame.

    Raises InputError (one line, naming the path) for a missing file, a directory, an empty
    file, a file FFmpeg cannot read (text, garbage), one without a picture (audio only), a
    damaged or truncated picture, and one larger than ``MAX_IMAGE_PIXELS``.
    """
    name = check_file(path, "image", IMAGE_KINDS)
    with open_media(path, "image", IMAGE_KINDS) as container:
        streams = list(container.streams.video)
        if not streams:
            raise InputError(f"image {name} has no picture in it{only_streams(container)}; give {IMAGE_KINDS}")
        stream = streams[0]
        _check_pixels(name, stream.width, stream.height)
        # A damaged picture must fail instead of being concealed (a truncated JPEG would
        # otherwise come back with its missing part painted grey).
        stream.codec_context.options = {"err_detect": "explode"}
        frame = _first_frame(container, stream, path, name)
        if frame is None:
            raise InputError(_damaged_message(path, name, "it holds no picture", stream.width > 0))
        _check_pixels(name, frame.width, frame.height)
        return frame_to_rgb(frame, keep_alpha_as_black=True)


def _first_frame(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                 path: str | os.PathLike, name: str) -> av.VideoFrame | None:
    try:
        for frame in container.decode(stream):
            return frame
    except _AV_ERRORS as e:
        raise InputError(_damaged_message(path, name, reason(e), stream.width > 0)) from None
    return None


def _damaged_message(path: str | os.PathLike, name: str, why: str, header_read: bool) -> str:
    """Why the picture did not decode; ``header_read``: FFmpeg understood its header (so it knows the size)."""
    if _is_animated_webp(path):
        return (f"image {name} is an animated WebP, which FFmpeg cannot decode; "
                "save its first frame as a PNG, or convert it to a GIF or APNG")
    if header_read:
        return f"image {name} is damaged or truncated and cannot be decoded ({why}); re-export or re-download it"
    return (f"image {name} cannot be decoded as a picture ({why}): it is not an image, or it is damaged; "
            f"give {IMAGE_KINDS}")


def _is_animated_webp(path: str | os.PathLike) -> bool:
    """Whether the file starts like an extended WebP with its animation flag set."""
    try:
        with open(path, "rb") as f:
            head = f.read(21)
    except OSError:
        return False
    return len(head) == 21 and head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8X" and bool(head[20] & 0x02)


def _check_pixels(name: str, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"image {name} is {width}x{height}; images up to {MAX_IMAGE_PIXELS:,} pixels are read: "
                         "scale it down first")


# --- shared with video.py -------------------------------------------------------------------


def frame_to_rgb(frame: av.VideoFrame, keep_alpha_as_black: bool = False) -> np.ndarray:
    """A decoded frame as RGB uint8 (H, W, 3), turned as its display matrix says.

    With ``keep_alpha_as_black``, transparent pixels are composited onto black.
    """
    has_alpha = frame.format.has_palette or any(c.is_alpha for c in frame.format.components)
    if keep_alpha_as_black and has_alpha:
        rgba = frame.to_ndarray(format="rgba")
        rgb = np.ascontiguousarray(rgba[..., :3])
        for top in range(0, rgb.shape[0], 256):  # in bands, to keep the uint16 copies small
            alpha = rgba[top : top + 256, :, 3:].astype(np.uint16)
            band = rgb[top : top + 256]
            band[...] = (band.astype(np.uint16) * alpha + 127) // 255
    else:
        rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = round((frame.rotation or 0) / 90) % 4
    if quarter_turns:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=quarter_turns))
    return rgb


def check_file(path: str | os.PathLike, what: str, kinds: str) -> str:
    """The path as text, after checking it names a readable, non-empty regular file."""
    try:
        name = os.fsdecode(path)
    except TypeError:
        raise InputError(f"{what} {path!r} is not a file path; give the path of {kinds}") from None
    try:
        info = os.stat(name)
    except FileNotFoundError:
        raise InputError(f"{what} {name} does not exist; check the path") from None
    except PermissionError:
        raise InputError(f"{what} {name} cannot be read (permission denied); check its permissions") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{what} {name} cannot be read ({reason(e)}); check the path") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{what} {name} is a directory; give the path of {kinds}")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{what} {name} is not a regular file; give the path of {kinds}")
    if info.st_size == 0:
        raise InputError(f"{what} {name} is empty (0 bytes); give {kinds}")
    return name


@contextlib.contextmanager
def open_media(path: str | os.PathLike, what: str, kinds: str) -> Iterator[av.container.InputContainer]:
    """The file opened with PyAV, as a context manager; a failure to open it is an InputError.

    The file is handed to FFmpeg as an open Python file, so that its name is never read as a
    protocol ("a:b.png"), an image sequence pattern ("frame%03d.png") or anything but a file.
    """
    name = os.fsdecode(path)
    try:
        handle = open(name, "rb")
    except PermissionError:
        raise InputError(f"{what} {name} cannot be read (permission denied); check its permissions") from None
    except OSError as e:
        raise InputError(f"{what} {name} cannot be read ({reason(e)}); check the path") from None
    with handle:
        try:
            container = av.open(handle, "r", metadata_errors="replace")
        except _AV_ERRORS as e:
            raise InputError(f"{what} {name} is not a file FFmpeg can read ({reason(e)}); give {kinds}") from None
        try:
            yield container
        finally:
            container.close()


def only_streams(container: av.container.InputContainer) -> str:
    """" (only audio)" or the like: what the file holds instead of a picture."""
    kinds = sorted({s.type for s in container.streams if s.type != "video"})
    return f" (only {' and '.join(kinds)})" if kinds else ""


def reason(exc: BaseException) -> str:
    """An exception's message as a short phrase: its strerror, else its first line."""
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return str(text).splitlines()[0]
