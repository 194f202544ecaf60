"""Fingerprints of input files, and telling when one changed or went away."""

import hashlib
import os

import pytest

from fifo_stream.errors import InputError
from fifo_stream.inputs import record
from fifo_stream.inputs.record import check_input, describe_input


def one_line(error, *parts):
    message = str(error)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


def test_describe_input(tmp_path, monkeypatch):
    data = os.urandom(3 * record.CHUNK_BYTES + 123)  # several chunks and a partial one
    (tmp_path / "clip.mp4").write_bytes(data)
    monkeypatch.chdir(tmp_path)
    described = describe_input("clip.mp4")
    assert described == {"path": str(tmp_path / "clip.mp4"), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert os.path.isabs(described["path"])
    assert describe_input(tmp_path / "clip.mp4") == described


def test_unchanged_input_passes(tmp_path, monkeypatch):
    path = tmp_path / "start.png"
    path.write_bytes(b"\x89PNG not really" * 100)
    monkeypatch.chdir(tmp_path)
    described = describe_input("start.png")
    monkeypatch.chdir("/")
    check_input(described, "init image")  # the absolute path still finds it
    os.utime(path, (0, 0))
    check_input(described, "init image")  # a new modification time is not a change


def test_changed_input(tmp_path):
    path = tmp_path / "start.png"
    path.write_bytes(b"a" * 1000)
    described = describe_input(path)
    path.write_bytes(b"b" + b"a" * 999)  # same size, other content
    with pytest.raises(InputError) as info:
        check_input(described, "init image")
    assert one_line(info.value) == (
        f"init image {path} changed since the run started (its SHA-256 differs); "
        "restore it, or pass --force to continue with it as it is"
    )
    path.write_bytes(b"a" * 1001)  # other size
    with pytest.raises(InputError, match="changed since the run started"):
        check_input(described, "init video")
    path.write_bytes(b"a" * 1000)
    check_input(described, "init image")  # restored


def test_missing_input(tmp_path):
    path = tmp_path / "clip.mkv"
    path.write_bytes(b"x" * 10)
    described = describe_input(path)
    path.unlink()
    with pytest.raises(InputError) as info:
        check_input(described, "init video")
    assert one_line(info.value).startswith(f"init video {path} is missing")
    path.mkdir()  # a directory in its place is not the file
    with pytest.raises(InputError, match="is missing"):
        check_input(described, "init video")


def test_describe_input_refuses_what_is_not_a_file(tmp_path):
    with pytest.raises(InputError) as info:
        describe_input(tmp_path / "nothing.png")
    one_line(info.value, str(tmp_path / "nothing.png"), "does not exist")
    with pytest.raises(InputError) as info:
        describe_input(tmp_path)
    one_line(info.value, str(tmp_path), "is a directory")


def test_not_a_record():
    with pytest.raises(ValueError):
        check_input({"path": "/x"}, "init image")
