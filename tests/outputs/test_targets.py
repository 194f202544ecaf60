"""Dispatch: which sink an output target opens, and the errors for bad targets."""

import sys

import pytest

from fifo_stream.outputs.base import SinkError
from fifo_stream.outputs.file import FileSink
from fifo_stream.outputs.pipe import PipeSink
from fifo_stream.outputs.png import PngSink
from fifo_stream.outputs.targets import open_sink
from sink_frames import H, W, free_port


def test_open_sink_dispatch(tmp_path):
    assert isinstance(open_sink(str(tmp_path / "a.mkv"), W, H, 8), FileSink)
    assert isinstance(open_sink(str(tmp_path) + "/", W, H, 8), PngSink)
    assert isinstance(open_sink(str(tmp_path / "new") + "/", W, H, 8), PngSink)
    pipe = open_sink("-", W, H, 8, fmt="rawvideo")
    assert isinstance(pipe, PipeSink) and pipe.stream is sys.stdout.buffer
    with pytest.raises(SinkError, match="scheme ftp://"):
        open_sink("ftp://x/y.mp4", W, H, 8)
    with pytest.raises(SinkError, match="extension"):
        open_sink(str(tmp_path / "a.gif"), W, H, 8)
    with pytest.raises(SinkError, match="cannot stream"):
        open_sink(f"rtmp://127.0.0.1:{free_port()}/live/x", W, H, 8)
    (tmp_path / "f").write_text("x")
    with pytest.raises(SinkError, match="is a file"):
        open_sink(str(tmp_path / "f") + "/", W, H, 8)
    with pytest.raises(SinkError, match="not valid"):
        open_sink(str(tmp_path / "b.mp4"), W, H, 8, bogus=1)
