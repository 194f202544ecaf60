"""PNG frames."""

from fifo_stream.outputs.png import PngSink
from sink_frames import H, W, decode, frame


def test_png_sink(tmp_path):
    with PngSink(tmp_path / "frames", W, H) as sink:
        for i in range(4):
            sink.write(frame(i))
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png"]
    for i, name in enumerate(names):
        (img,) = decode(str(tmp_path / "frames" / name))
        assert (img == frame(i)).all()  # lossless
