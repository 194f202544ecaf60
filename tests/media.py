"""Test media made with PyAV: audio-only files (what an image or video reader must refuse)."""

import av
import numpy as np

TONES = {  # container -> (codec, sample rate, sample format)
    "wav": ("pcm_s16le", 8000, "s16"),
    "mp4": ("aac", 16000, "fltp"),
}


def write_tone(path, container: str = "wav"):
    """Half a second (wav) or a second (mp4) of a 440 Hz tone, and no video stream."""
    codec, rate, sample_format = TONES[container]
    t = np.arange(rate if container == "mp4" else rate // 2) / rate
    wave = np.sin(2 * np.pi * 440 * t)
    samples = (wave * 8000).astype(np.int16) if sample_format == "s16" else (wave * 0.3).astype(np.float32)
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format=sample_format, layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path
