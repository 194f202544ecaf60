"""One writer per run directory: an OS file lock that ``generate`` and ``resume`` hold throughout.

``flock`` on ``DIR/lock``: the kernel releases it when the holding process ends in any way
(SIGKILL included), so a crash never leaves a lock that blocks the next start. Taking the
lock writes nothing; the holder's PID, for the error message, is read from /proc/locks.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import FifoStreamError

LOCK = "lock"
_held: dict[Path, int] = {}  # run directory -> descriptor of its lock file, in this process


class InUse(FifoStreamError):
    """Another process holds the run directory."""


def _pid(fd: int) -> str:
    """The PID that holds an flock on the file open as ``fd`` (Linux /proc/locks), else "unknown"."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                parts = line.split()
                if parts[1:2] == ["FLOCK"] and len(parts) > 5 and parts[5] == inode:
                    return parts[4]
    except OSError:
        pass
    return "unknown"


def _in_use(run_dir: Path, pid: str) -> InUse:
    return InUse(f"run directory {run_dir} is in use by process {pid}; wait for it or stop it")


def acquire(run_dir: str | os.PathLike) -> None:
    """Take the lock of an existing run directory, or refuse with one line naming the holder's PID."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held:
        return
    fd = os.open(run_dir / LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _pid(fd)
        os.close(fd)
        raise _in_use(run_dir, pid) from None
    _held[key] = fd


def holder(run_dir: str | os.PathLike) -> str | None:
    """The PID of another process that holds the run directory, or None; takes and creates nothing."""
    run_dir = Path(run_dir)
    if run_dir.resolve() in _held:
        return None
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody has held it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _pid(fd)
    finally:
        os.close(fd)  # closing drops a shared lock taken here


def check_free(run_dir: str | os.PathLike) -> None:
    """Refuse a run directory that another process holds."""
    pid = holder(run_dir)
    if pid is not None:
        raise _in_use(Path(run_dir), pid)


def release(run_dir: str | os.PathLike) -> None:
    """Let go of a lock this process holds (the end of the process does it too)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)
