"""The live page's server over real HTTP: status, events, prompts, tokens, and what it refuses to serve."""

import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from fifo_stream.consistency.storyboard import Scene
from fifo_stream.live import LiveControl, Progress
from fifo_stream.web import LiveServer, ServeError
from fifo_stream.web.server import HEARTBEAT


class FakeLoop:
    """Answers live prompts as the frame loop would: from the frame asked for or else 40, 'dog' refused."""

    def __init__(self, control: LiveControl, progress: Progress):
        self.control, self.progress, self.stop = control, progress, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        from fifo_stream.errors import FifoStreamError

        while not self.stop.wait(0.01):
            request = self.control.take()
            if request is None:
                continue
            if "dog" in request.prompt:
                request.answer.set_exception(FifoStreamError("this model does not know the word(s) 'dog'"))
            else:
                frame = 40 if request.frame is None else request.frame
                self.progress.scene(Scene(frame, request.prompt, request.transition, request.anchor), request.source)
                request.answer.set_result(frame)


@pytest.fixture
def serve(tmp_path):
    servers, loops = [], []

    def start(token=None, bind="127.0.0.1:0", with_hls=True):
        progress = Progress(100, [{"frame": 0, "prompt": "a red circle"}], "none")
        progress.start(0)
        control = LiveControl()
        hls = tmp_path / "live" / "index.m3u8"
        hls.parent.mkdir(exist_ok=True)
        hls.write_text("#EXTM3U\n")
        (hls.parent / "seg000000.ts").write_bytes(b"G" * 188)
        (tmp_path / "run.json").write_text("{}")  # a neighbour that must not be served
        server = LiveServer(bind, token, progress, control, hls if with_hls else None)
        server.start()
        servers.append(server)
        loops.append(FakeLoop(control, progress))
        return server, progress

    yield start
    for loop in loops:
        loop.stop.set()
    for server in servers:
        server.stop()


def request(server, path, body=None, headers=None, method=None):
    """(status, headers, body bytes) of one request, errors included."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method or ("POST" if data is not None else "GET"), path, data, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return out


def test_status_page_and_assets(serve):
    server, progress = serve()
    progress.frame("a red circle")
    status, _, body = request(server, "/status")
    data = json.loads(body)
    assert status == 200 and data["frame"] == 1 and data["total"] == 100 and data["hls"] == "/hls/index.m3u8"
    assert data["storyboard"] == [{"frame": 0, "prompt": "a red circle"}]
    status, headers, page = request(server, "/")
    assert status == 200 and b"/static/hls.light.min.js" in page and b"://" not in page  # no CDN: every asset is ours
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for name in ("app.js", "style.css", "hls.light.min.js", "LICENSE.hls.js"):
        assert request(server, f"/static/{name}")[0] == 200
    status, headers, _ = request(server, "/hls/index.m3u8")
    assert status == 200 and headers["Content-Type"] == "application/vnd.apple.mpegurl"
    assert request(server, "/hls/seg000000.ts")[1]["Content-Type"] == "video/mp2t"


@pytest.mark.parametrize("path", [
    "/hls/../run.json", "/hls/%2e%2e%2frun.json", "/hls/..%2frun.json", "/hls/%2e%2e/run.json", "/hls/run.json",
    "/static/../server.py", "/static/%2e%2e%2fserver.py", "/static/index.html%00", "/static/server.py", "/hls/index.m3u8/../../run.json",
    "/run.json", "/live/index.m3u8", "/hls/missing.ts",
])
def test_nothing_else_is_served(serve, path):
    server, _ = serve()
    status, _, body = request(server, path)
    assert status in (400, 404) and b"{}" != body


def test_a_prompt_is_answered_with_its_frame_and_reaches_the_events(serve):
    server, progress = serve()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("GET", "/events")
    events = conn.getresponse()
    assert events.status == 200 and events.headers["Content-Type"] == "text/event-stream"
    first = json.loads(events.readline()[len(b"data: "):])
    assert first["event"] == "status" and first["total"] == 100
    events.readline()
    status, _, body = request(server, "/prompt", {"prompt": " a blue square moves left on a white background ", "transition": 4})
    assert status == 200 and json.loads(body) == {"frame": 40, "prompt": "a blue square moves left on a white background", "transition": 4, "anchor": "keep"}
    event = json.loads(events.readline()[len(b"data: "):])
    assert event == {"event": "prompt", "frame": 40, "prompt": "a blue square moves left on a white background", "transition": 4, "anchor": "keep", "source": "web"}
    status, _, body = request(server, "/prompt", {"prompt": "a red circle", "frame": 75, "anchor": "renew"})
    assert status == 200 and json.loads(body) == {"frame": 75, "prompt": "a red circle", "transition": None, "anchor": "renew"}
    events.readline()
    assert json.loads(events.readline()[len(b"data: "):])["frame"] == 75
    started = time.monotonic()
    server.stop()  # ends the open stream at once, not at its next heartbeat
    assert events.read().strip() == b"" and time.monotonic() - started < HEARTBEAT / 3
    conn.close()


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "a dog"}, 400, "does not know the word(s) 'dog'"),
    ({"prompt": ""}, 400, "non-empty prompt"),
    ({"prompt": 3}, 400, "non-empty prompt"),
    (["a red circle"], 400, "non-empty prompt"),
    ({"prompt": "a red circle", "transition": -1}, 400, "transition must be"),
    ({"prompt": "a red circle", "transition": True}, 400, "transition must be"),
    ({"prompt": "a red circle", "frame": -3}, 400, "frame must be a whole number"),
    ({"prompt": "a red circle", "frame": "12"}, 400, "frame must be a whole number"),
    ({"prompt": "a red circle", "frame": 1.5}, 400, "frame must be a whole number"),
    ({"prompt": "a red circle", "at": 3}, 400, "unknown field(s) at; send prompt, transition, frame, anchor"),
    ({"prompt": "a red circle", "anchor": "forget"}, 400, 'anchor must be "keep"'),
    ({"prompt": "x" * 1001}, 400, "over 1000 characters"),
    (b"{not json", 400, "must be JSON"),
    (b"{\"prompt\": \"" + b"a " * 10000 + b"\"}", 413, "over 16384 bytes"),
])
def test_bad_prompts_get_one_line_errors(serve, body, status, message):
    server, _ = serve()
    got, _, answer = request(server, "/prompt", body)
    assert got == status and message in json.loads(answer)["error"]


def test_a_token_guards_every_request(serve):
    server, _ = serve(token="s3cret")
    for path in ("/", "/status", "/static/app.js", "/hls/index.m3u8", "/events"):
        assert request(server, path)[0] == 401
    assert request(server, "/prompt", {"prompt": "a red circle"})[0] == 401
    assert request(server, "/status", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert request(server, "/status", headers={"Authorization": "Bearer s3cret"})[0] == 200
    status, headers, _ = request(server, "/?token=s3cret")
    assert status == 200 and "fifo_stream_token=s3cret" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
    assert request(server, "/hls/index.m3u8", headers={"Cookie": "fifo_stream_token=s3cret"})[0] == 200


def test_binds_beyond_loopback_need_a_token_and_bad_binds_are_one_line(serve):
    progress, control = Progress(1, [], "none"), LiveControl()
    with pytest.raises(ServeError, match="reachable from other machines; add --serve-token"):
        LiveServer("0.0.0.0:0", None, progress, control, None)
    with pytest.raises(ServeError, match="is not \\[HOST:\\]PORT"):
        LiveServer("127.0.0.1:http", None, progress, control, None)
    server, _ = serve()
    with pytest.raises(ServeError, match=f"cannot serve on 127.0.0.1:{server.port}"):
        LiveServer(f"127.0.0.1:{server.port}", None, progress, control, None).start()
    open_server, _ = serve(token="t", bind="0.0.0.0:0", with_hls=False)
    status, _, body = request(open_server, "/status", headers={"Authorization": "Bearer t"})
    assert status == 200 and json.loads(body)["hls"] is None
    assert request(open_server, "/hls/index.m3u8", headers={"Authorization": "Bearer t"})[0] == 404
