"""A real RTMP server for tests: nginx with its RTMP module, recording every published stream to .flv files.

Use the ``nginx_rtmp`` fixture (import it into the test module); it skips the test when nginx
or its RTMP module is missing (Debian packages nginx and libnginx-mod-rtmp). ``count_frames``
needs ffprobe: mark its tests ``needs_ffprobe``.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sink_frames import free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
FFPROBE = shutil.which("ffprobe") or "/usr/bin/ffprobe"
needs_ffprobe = pytest.mark.skipif(not os.access(FFPROBE, os.X_OK), reason="needs ffprobe (Debian package ffmpeg)")

CONFIG = """\
{load_module}
daemon off;
master_process on;
worker_processes 1;
{user}
pid {root}/nginx.pid;
lock_file {root}/nginx.lock;
error_log {root}/error.log info;
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        application live {{
            live on;
            record all;
            record_path {root}/records;
            record_unique on;
        }}
    }}
}}
"""


def rtmp_module() -> str | None:
    """The ``load_module`` line nginx needs for RTMP ("" if built in); None without nginx or the module."""
    if not os.access(NGINX, os.X_OK):
        return None
    info = subprocess.run([NGINX, "-V"], capture_output=True, text=True).stderr
    if re.search(r"--add-module=\S*rtmp", info):
        return ""
    modules = re.search(r"--modules-path=(\S+)", info)
    path = Path(modules.group(1) if modules else "/usr/lib/nginx/modules") / "ngx_rtmp_module.so"
    return f"load_module {path};" if path.exists() else None


class NginxRTMP:
    """nginx as a child process on 127.0.0.1:``port`` (a free one by default), with everything under ``root``.

    Application ``live`` records each publish of stream NAME to ``records/NAME-UNIXTIME.flv``.
    ``start`` and ``stop`` may be repeated; the port stays the same.
    """

    def __init__(self, root: Path, load_module: str, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.records = root / "records"
        self.records.mkdir(parents=True, exist_ok=True)
        self.config = root / "nginx.conf"
        # As root, workers would run as nobody, who cannot write to the test's temporary directory.
        user = "user root;" if os.geteuid() == 0 else ""
        self.config.write_text(CONFIG.format(load_module=load_module, user=user, root=root, port=self.port))
        self.proc: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{name}"

    def start(self, timeout: float = 10.0) -> None:
        """Start nginx and wait until its port accepts connections."""
        assert self.proc is None, "nginx is already running"
        with open(self.root / "stderr.log", "ab") as log:
            self.proc = subprocess.Popen([NGINX, "-p", str(self.root), "-c", str(self.config), "-e", str(self.root / "error.log")],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                raise AssertionError(f"nginx exited at start:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop(graceful=False)
                    raise AssertionError(f"nginx does not listen on port {self.port}:\n{self.log()}") from None
                time.sleep(0.05)

    def stop(self, graceful: bool = True, timeout: float = 10.0) -> None:
        """Stop nginx (no-op if stopped). Graceful: once the streams' sessions have ended, so their recordings
        are complete (a publisher still streaming is an error); else at once, dropping every connection."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGQUIT if graceful else signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker too: it outlives a killed master
            proc.wait()
            raise AssertionError(f"nginx did not stop within {timeout} s") from None

    def recordings(self, name: str) -> list[Path]:
        """The recordings of stream ``name``, oldest first."""
        return sorted(self.records.glob(f"{name}-*.flv"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.root / "stderr.log", self.root / "error.log") if p.exists())


def count_frames(path: Path) -> int:
    """The number of video frames ffprobe decodes from ``path``."""
    out = subprocess.run(
        [FFPROBE, "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout
    return int(out.strip())


@pytest.fixture
def nginx_rtmp(tmp_path):
    """A started :class:`NginxRTMP` under ``tmp_path/nginx``, stopped at teardown."""
    load_module = rtmp_module()
    if load_module is None:
        pytest.skip(f"needs nginx with the RTMP module ({NGINX}; Debian packages nginx and libnginx-mod-rtmp)")
    server = NginxRTMP(tmp_path / "nginx", load_module)
    server.start()
    yield server
    server.stop(graceful=False)
