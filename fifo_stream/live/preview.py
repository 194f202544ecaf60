"""``preview.jpg``: the latest frame as a JPEG in the run directory, replaced atomically."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from ..durable import atomic_write

PREVIEW = "preview.jpg"


def write_preview(run_dir: Path, frame: np.ndarray) -> None:
    """Replace ``run_dir/preview.jpg`` with ``frame`` (H, W, 3) uint8, so a reader never sees a partial file."""
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = frame.shape[1], frame.shape[0], "yuvj444p"
    codec.time_base = 1
    image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")  # the encoder converts it with its own scaler
    data = b"".join(bytes(p) for p in [*codec.encode(image), *codec.encode(None)])
    atomic_write(Path(run_dir) / PREVIEW, data)
