"""Segments: cutting, resumed numbering, joining by stream copy."""

from pathlib import Path

import av
import pytest

from fifo_stream.outputs.base import SinkError
from fifo_stream.outputs.segments import SegmentWriter, find_segments, join_segments
from sink_frames import H, W, assert_frames, decode, frame


def packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(video=0) if p.size]


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_segments_join_by_stream_copy(tmp_path, ext):
    writer = SegmentWriter(tmp_path / "segs", "run", ext, W, H, 8)
    lengths, n, segments = [5, 13, 8], 0, []
    for length in lengths:
        for _ in range(length):
            writer.write(frame(n))
            n += 1
        segments.append(writer.cut())
    assert writer.cut() is None
    assert segments == [tmp_path / "segs" / f"run.0000{i}{ext}" for i in range(3)]
    assert not list((tmp_path / "segs").glob("*.partial"))
    for segment, length in zip(segments, lengths):
        with av.open(str(segment)) as c:
            pts = [f.pts for f in c.decode(video=0)]
        assert len(pts) == length and min(pts) == 0

    out = join_segments(segments, tmp_path / f"joined{ext}")
    frames = decode(str(out))
    assert len(frames) == sum(lengths)
    assert_frames(frames)
    assert packets(out) == [p for s in segments for p in packets(s)]  # no re-encode
    with av.open(str(out)) as c:
        pts = [f.pts for f in c.decode(video=0)]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)
    assert not list(tmp_path.glob(".*joining"))


def test_segment_writer_resumes_numbering(tmp_path):
    writer = SegmentWriter(tmp_path, "run", "mkv", W, H, 8)
    writer.write(frame(0))
    first = writer.cut()
    writer.write(frame(1))  # left as .partial, as after a crash
    resumed = SegmentWriter(tmp_path, "run", "mkv", W, H, 8)
    assert resumed.index == 1
    resumed.write(frame(1))
    resumed.close()
    assert find_segments(tmp_path, "run", ".mkv") == [first, tmp_path / "run.00001.mkv"]
    writer._sink.close()


def test_join_errors(tmp_path):
    with pytest.raises(SinkError, match="no segments"):
        join_segments([], tmp_path / "out.mp4")
    with pytest.raises(SinkError, match="extension"):
        join_segments([tmp_path / "x.mkv"], tmp_path / "out.avi")
    writer = SegmentWriter(tmp_path, "run", ".mkv", W, H, 8)
    writer.write(frame(0))
    segment = writer.cut()
    with pytest.raises(SinkError, match="cannot hold h264"):
        join_segments([segment], tmp_path / "out.webm")
