"""HLS playlists, read back as a client reads them (ffprobe, PyAV's hls demuxer)."""

import json
import shutil
import subprocess

import pytest

from fifo_stream.outputs.base import SinkError
from fifo_stream.outputs.hls import HlsSink
from fifo_stream.outputs.targets import open_sink, validate_targets
from sink_frames import H, W, assert_frames, decode, frame

FFPROBE = shutil.which("ffprobe")
pytestmark = pytest.mark.skipif(FFPROBE is None, reason="needs ffprobe (Debian: apt-get install ffmpeg)")
FPS = 8


def probe(playlist, *args) -> str:
    return subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0", *args, str(playlist)],
                          capture_output=True, text=True, check=True, timeout=60).stdout


def frame_count(playlist) -> int:
    return int(probe(playlist, "-count_frames", "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0").split()[0])


def decoded(playlist) -> tuple[list[int], list[int]]:
    """The frame index (from the pts) of every frame a client decodes, and of every keyframe."""
    frames = json.loads(probe(playlist, "-show_entries", "frame=pts,key_frame", "-of", "json"))["frames"]
    index = [f["pts"] * FPS / 90000 for f in frames]
    return index, [i for i, f in zip(index, frames) if f["key_frame"]]


def listing(playlist) -> list[tuple[int, str]]:
    """(frames, file) per listed segment, the frame count read from its EXTINF duration."""
    lines = playlist.read_text().splitlines()
    return [(round(float(line[8:-1]) * FPS), lines[i + 1]) for i, line in enumerate(lines) if line.startswith("#EXTINF:")]


def write(sink, frames):
    for i in frames:
        sink.write(frame(i))


def test_segments_keyframes_and_endlist(tmp_path):
    playlist = tmp_path / "live" / "index.m3u8"
    # 4 frames a segment; no scene-cut keyframes (these test frames all differ a lot)
    sink = open_sink(str(playlist), W, H, FPS, frames=10, segment_seconds=0.5, codec_options={"sc_threshold": "0"})
    assert isinstance(sink, HlsSink) and "#EXT-X-TARGETDURATION:1" in playlist.read_text()
    write(sink, range(3))
    sink.cut()  # a checkpoint: the segment ends early
    sink.cut()  # nothing open: nothing happens
    write(sink, range(3, 9))
    assert listing(playlist) == [(3, "seg000000.ts"), (4, "seg000001.ts")]
    assert "#EXT-X-ENDLIST" not in playlist.read_text()  # one frame to go
    write(sink, [9])
    sink.close()
    text = playlist.read_text()
    assert text.startswith("#EXTM3U\n#EXT-X-VERSION:3\n") and text.endswith("#EXT-X-ENDLIST\n")
    assert "#EXTINF:0.375000,\nseg000000.ts" in text and "#EXT-X-MEDIA-SEQUENCE:0" in text
    assert listing(playlist) == [(3, "seg000000.ts"), (4, "seg000001.ts"), (3, "seg000002.ts")]
    assert sorted(p.name for p in playlist.parent.iterdir()) == ["index.m3u8", "seg000000.ts", "seg000001.ts", "seg000002.ts"]
    assert frame_count(playlist) == 10
    assert decoded(playlist) == (list(range(10)), [0, 3, 7])  # one timeline; a keyframe starts each segment
    frames = decode(str(playlist))
    assert len(frames) == 10
    assert_frames(frames)


def test_list_size_bounds_the_playlist_and_the_disk(tmp_path):
    playlist = tmp_path / "index.m3u8"
    with HlsSink(playlist, W, H, FPS, list_size=2, segment_seconds=1 / FPS) as sink:  # 1 frame a segment
        write(sink, range(9))
    text = playlist.read_text()
    assert "#EXT-X-MEDIA-SEQUENCE:7" in text and text.endswith("#EXT-X-ENDLIST\n")  # frames=None: any close ends it
    assert [name for _, name in listing(playlist)] == ["seg000007.ts", "seg000008.ts"]
    # Two more stay for clients that read an older playlist.
    assert sorted(p.name for p in tmp_path.glob("seg*.ts")) == [f"seg00000{i}.ts" for i in (5, 6, 7, 8)]
    assert frame_count(playlist) == 2
    assert_frames(decode(str(playlist)), first=7)


def test_closed_early_stays_live(tmp_path):
    playlist = tmp_path / "index.m3u8"
    with HlsSink(playlist, W, H, FPS, frames=10, segment_seconds=0.5) as sink:
        write(sink, range(6))
    assert "#EXT-X-ENDLIST" not in playlist.read_text()
    assert listing(playlist) == [(4, "seg000000.ts"), (2, "seg000001.ts")]


def test_resume_drops_what_follows_and_continues(tmp_path):
    playlist = tmp_path / "index.m3u8"
    sink = HlsSink(playlist, W, H, FPS, frames=12, segment_seconds=0.5)
    write(sink, range(6))
    sink.cut()  # checkpoint at frame 6
    write(sink, range(6, 11))  # then killed: frames 6-9 listed, frame 10 in an unfinished segment
    assert (tmp_path / ".seg000003.ts.tmp").exists() and len(listing(playlist)) == 3
    (tmp_path / "seg000009.ts").write_bytes(b"stray")

    with pytest.raises(SinkError, match="no segment boundary at frame 5") as info:
        HlsSink(playlist, W, H, FPS, start=5, frames=12, segment_seconds=0.5)
    assert "\n" not in str(info.value)
    with HlsSink(playlist, W, H, FPS, start=6, frames=12, segment_seconds=0.5) as sink:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["index.m3u8", "seg000000.ts", "seg000001.ts"]
        write(sink, range(6, 12))
    text = playlist.read_text()
    assert "seg000001.ts\n#EXT-X-DISCONTINUITY\n#FIFO-STREAM-FRAMES:6,4\n" in text and text.endswith("#EXT-X-ENDLIST\n")
    assert listing(playlist) == [(4, "seg000000.ts"), (2, "seg000001.ts"), (4, "seg000002.ts"), (2, "seg000003.ts")]
    assert frame_count(playlist) == 12
    assert_frames(decode(str(playlist)))


def test_resume_after_the_boundary_left_the_list(tmp_path):
    playlist = tmp_path / "index.m3u8"
    sink = HlsSink(playlist, W, H, FPS, list_size=1, segment_seconds=0.25)  # 2 frames a segment
    write(sink, range(4))  # checkpoint at frame 4, then segments 4-5 and 6-7: only 6-7 listed
    write(sink, range(4, 8))
    with HlsSink(playlist, W, H, FPS, start=4, frames=8, list_size=1, segment_seconds=0.25) as sink:
        assert "#EXT-X-MEDIA-SEQUENCE:4" in playlist.read_text() and not list(tmp_path.glob("seg*"))
        write(sink, range(4, 8))
    text = playlist.read_text()
    # The discontinuity went out of the list with segment 4: the count keeps the numbering of the rest.
    assert "#EXT-X-MEDIA-SEQUENCE:5\n#EXT-X-DISCONTINUITY-SEQUENCE:1\n#FIFO-STREAM-FRAMES:6,2\n" in text
    assert_frames(decode(str(playlist)), first=6)


def test_resume_without_a_playlist_starts_one(tmp_path):
    playlist = tmp_path / "index.m3u8"
    with HlsSink(playlist, W, H, FPS, start=5, frames=7) as sink:
        write(sink, range(5, 7))
    assert "#FIFO-STREAM-FRAMES:5,2\n" in playlist.read_text() and "DISCONTINUITY" not in playlist.read_text()
    assert frame_count(playlist) == 2


def test_bad_targets_are_one_line(tmp_path):
    (tmp_path / "dir.m3u8").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "other.m3u8").write_text("#EXTM3U\n#EXTINF:2.0,\nhttp://example.com/a.ts\n")
    cases = {
        str(tmp_path / "dir.m3u8"): "is a directory; give a file name such as",
        str(tmp_path / "file" / "index.m3u8"): "cannot create HLS directory",
    }
    for target, message in cases.items():
        with pytest.raises(SinkError, match=message) as info:
            open_sink(target, W, H, FPS)
        assert "\n" not in str(info.value)
    with pytest.raises(SinkError, match="not written by fifo-stream .at 'http://example.com/a.ts'.; delete it"):
        HlsSink(tmp_path / "other.m3u8", W, H, FPS, start=3)
    with pytest.raises(SinkError, match="segment_seconds > 0"):
        HlsSink(tmp_path / "a" / "index.m3u8", W, H, FPS, segment_seconds=0)
    with pytest.raises(SinkError, match="are HLS playlists in one directory"):
        validate_targets([str(tmp_path / "a" / "one.m3u8"), str(tmp_path / "a" / "two.M3U8")], tmp_path / "run" / "segments")
    with pytest.raises(SinkError, match="inside the run directory"):
        validate_targets([str(tmp_path / "run" / "segments" / "x.m3u8")], tmp_path / "run" / "segments")
    assert not (tmp_path / "a").exists()
