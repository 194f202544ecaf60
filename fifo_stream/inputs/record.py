"""Fingerprints of the user's input files, so that a resumed run can tell whether they changed."""

from __future__ import annotations

import hashlib
import os
import stat

from ..errors import InputError

CHUNK_BYTES = 1 << 20


def describe_input(path: str | os.PathLike) -> dict:
    """``{"path": absolute path, "size": bytes, "sha256": hex digest}`` of a file, read in 1 MiB chunks.

    The path is made absolute (``os.path.abspath``: symbolic links are kept, not followed) so
    that the record still names the file when the run is resumed from another directory.
    Raises InputError if the file cannot be read.
    """
    name = os.path.abspath(os.fsdecode(path))
    try:
        with open(name, "rb") as f:
            info = os.fstat(f.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(21, "Is a directory")
            size, digest = _digest(f)
    except FileNotFoundError:
        raise InputError(f"input {name} does not exist; check the path") from None
    except IsADirectoryError:
        raise InputError(f"input {name} is a directory; give the path of a file") from None
    except OSError as e:
        raise InputError(f"input {name} cannot be read ({e.strerror or e}); check its permissions") from None
    return {"path": name, "size": size, "sha256": digest}


def check_input(record: dict, what: str) -> None:
    """Raise InputError unless the file in ``record`` (from ``describe_input``) is still there, unchanged.

    ``what`` names the input in the message, e.g. ``"init image"``. The size is compared
    first, then the SHA-256 of the whole file.
    """
    try:
        name, size, digest = record["path"], int(record["size"]), str(record["sha256"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"not a record from describe_input: {record!r}") from None
    changed = (f"{what} {name} changed since the run started (its SHA-256 differs); "
               "restore it, or pass --force to continue with it as it is")
    try:
        with open(name, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise FileNotFoundError(name)
            if os.fstat(f.fileno()).st_size != size:
                raise InputError(changed)
            if _digest(f) != (size, digest):
                raise InputError(changed)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise InputError(f"{what} {name} is missing; put it back at that path to resume the run") from None
    except OSError as e:
        raise InputError(f"{what} {name} cannot be read ({e.strerror or e}); check its permissions") from None


def _digest(f) -> tuple[int, str]:
    """The number of bytes read from ``f`` and their SHA-256 (hex)."""
    sha, size = hashlib.sha256(), 0
    while chunk := f.read(CHUNK_BYTES):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()
