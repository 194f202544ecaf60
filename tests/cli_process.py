"""The ``fifo-stream`` command in a fresh process forked from a server that has imported the package.

``python -m fifo_stream`` spends about 2 s starting Python and importing torch before it reads
its arguments; a fork server pays that once. Every command still runs in a process of its
own, with its own working directory, environment, stdout, stderr and exit status (negative:
killed by that signal), as with ``subprocess.run``. The server only imports modules, so its
children inherit no thread pool or other state of a run. Tests of the entry point itself,
of stdin, or of several processes at once run ``python -m fifo_stream`` instead.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import traceback

PRELOAD = ["fifo_stream.cli", "fifo_stream.runs.loop", "fifo_stream.models.loading", "fifo_stream.outputs.targets"]
_context = None


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(args: list[str], cwd: str | None, env: dict, out: str, err: str) -> None:
    if cwd is not None:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY)
        os.dup2(handle, fd)
        os.close(handle)
    code = 1
    try:
        from fifo_stream.cli import main

        code = main(args)
    except SystemExit as e:  # argparse, as the interpreter would report it
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class Forked:
    """A command started by :func:`start`: the parts of ``subprocess.Popen`` the tests use."""

    def __init__(self, args: list[str], cwd, env: dict | None):
        self.args = ["fifo-stream", *args]
        self._dir = tempfile.TemporaryDirectory()
        self._out, self._err = (os.path.join(self._dir.name, name) for name in ("stdout", "stderr"))
        for path in (self._out, self._err):
            open(path, "w").close()
        self.process = _server().Process(
            target=_child, args=(list(args), None if cwd is None else str(cwd), dict(env or os.environ), self._out, self._err)
        )
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the command, then (stdout, stderr) as text."""
        self.wait(timeout)
        with open(self._out) as o, open(self._err) as e:
            result = o.read(), e.read()
        self._dir.cleanup()
        return result


def start(*args: str, cwd=None, env: dict | None = None) -> Forked:
    """Start ``fifo-stream ARGS`` in ``cwd`` with ``env`` (default: this process's environment)."""
    return Forked(list(args), cwd, env)


def run(*args: str, cwd=None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``fifo-stream ARGS`` to its end, like ``subprocess.run(..., capture_output=True, text=True)``."""
    command = start(*args, cwd=cwd, env=env)
    try:
        out, err = command.communicate(timeout)
    except subprocess.TimeoutExpired:
        command.kill()
        command.wait()
        raise
    return subprocess.CompletedProcess(command.args, command.returncode, out, err)
