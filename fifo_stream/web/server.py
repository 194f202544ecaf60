"""The live page's HTTP server (aiohttp), on a thread inside the generating process.

Serves only: the page and its assets (a fixed list), the run's HLS playlist and segments,
``GET /status`` (progress as JSON), ``GET /events`` (server-sent events) and ``POST /prompt``
(a live prompt, answered with the frame it starts at). A bind other than loopback needs a
token; with a token, every request must carry it (``Authorization: Bearer``, the cookie the
page sets, or ``?token=``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import queue
import re
import socket
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from aiohttp import web

from ..consistency.storyboard import ANCHOR_POLICIES
from ..errors import FifoStreamError
from ..live import LiveControl, Progress, PromptRequest

STATIC = Path(__file__).parent / "static"
ASSETS = {  # the only page files served: name -> content type
    "app.js": "text/javascript",
    "style.css": "text/css",
    "hls.light.min.js": "text/javascript",
    "LICENSE.hls.js": "text/plain",
}
HLS_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\.(m3u8|ts)")
HLS_TYPES = {"m3u8": "application/vnd.apple.mpegurl", "ts": "video/mp2t"}
MAX_BODY = 16 * 1024  # bytes of a request body
MAX_PROMPT = 1000  # characters of a live prompt
ANSWER_TIMEOUT = 300  # seconds a prompt may wait for the frame loop
PROMPT_FIELDS = ("prompt", "transition", "frame", "anchor")  # a POST /prompt body's; all but the prompt optional
PROMPT_BODY = '{"prompt": TEXT, "transition": L, "frame": N, "anchor": "keep" or "renew"}'
HEARTBEAT = 15  # seconds between keep-alive comments on the event stream
COOKIE = "fifo_stream_token"
HEADERS = {"Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; worker-src 'self' blob:", "X-Content-Type-Options": "nosniff"}


class ServeError(FifoStreamError):
    pass


def parse_bind(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); the host defaults to 127.0.0.1, port 0 picks a free one."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise ServeError(f"--serve {text!r} is not [HOST:]PORT; e.g. --serve 8000 or --serve 0.0.0.0:8000 (with --serve-token)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LiveServer:
    """Serves one run's live page until :meth:`stop`; ``hls`` is the run's playlist (None: no video)."""

    def __init__(self, bind: str, token: str | None, progress: Progress, control: LiveControl, hls: Path | None):
        self.host, self.port = parse_bind(bind)
        if not is_loopback(self.host) and not token:
            raise ServeError(f"--serve on {self.host} is reachable from other machines; add --serve-token TOKEN (or serve on 127.0.0.1)")
        self.token, self.progress, self.control, self.hls = token, progress, control, hls
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._streams: set[queue.Queue] = set()  # the open event streams' queues

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> str:
        """Bind and serve on a daemon thread; returns the page's URL. A port in use is a one-line error."""
        try:
            sock = socket.create_server((self.host, self.port), family=socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        except OSError as e:
            raise ServeError(f"cannot serve on {self.host}:{self.port} ({e.strerror}); choose another port, e.g. --serve 0 for a free one") from None
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(sock, ready), name="live-server", daemon=True)
        self._thread.start()
        ready.wait()
        return self.url

    def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._run(sock, ready))
        self._loop.close()

    async def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        ready.set()
        await self._stopping.wait()
        for events in self._streams:  # end the open event streams, or each would hold cleanup up to a heartbeat
            events.put(None)
        await runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        app.add_routes([
            web.get("/", self.page),
            web.get("/static/{name}", self.asset),
            web.get("/hls/{name}", self.hls_file),
            web.get("/status", self.status),
            web.get("/events", self.events),
            web.post("/prompt", self.prompt),
        ])
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if self.token and not self._authorized(request):
            return web.json_response({"error": "this server needs its token: open the page as /?token=TOKEN"}, status=401, headers=HEADERS)
        response = await handler(request)
        response.headers.update(HEADERS)
        return response

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        offered = [header[7:] if header.startswith("Bearer ") else "", request.cookies.get(COOKIE, ""), request.query.get("token", "")]
        return any(hmac.compare_digest(o.encode(), self.token.encode()) for o in offered if o)

    async def page(self, request: web.Request) -> web.StreamResponse:
        response = web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache"})
        if self.token:  # the page's own requests (the player's included) carry the token as a cookie
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict")
        return response

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={"Content-Type": ASSETS[name]})

    async def hls_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if self.hls is None or not HLS_NAME.fullmatch(name) or not (self.hls.parent / name).is_file():
            raise web.HTTPNotFound()
        kind = name.rsplit(".", 1)[1]
        return web.FileResponse(self.hls.parent / name, headers={"Content-Type": HLS_TYPES[kind], "Cache-Control": "no-cache"})

    def _status(self) -> dict:
        return {**self.progress.status(), "hls": None if self.hls is None else f"/hls/{self.hls.name}"}

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        response.headers.update(HEADERS)
        await response.prepare(request)
        events = self.progress.subscribe()
        self._streams.add(events)
        try:
            await response.write(f"data: {json.dumps({'event': 'status', **self._status()})}\n\n".encode())
            while True:
                try:
                    event = await asyncio.to_thread(events.get, True, HEARTBEAT)
                    if event is None:  # the server stops
                        break
                    await response.write(f"data: {json.dumps(event)}\n\n".encode())
                except queue.Empty:
                    await response.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(events)
            self.progress.unsubscribe(events)
        return response

    async def prompt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": f"the request body is over {MAX_BODY} bytes"}, status=413)
        except ValueError:
            return web.json_response({"error": f"the body must be JSON: {PROMPT_BODY}"}, status=400)
        problem = _check_prompt(body)
        if problem:
            return web.json_response({"error": problem}, status=400)
        transition, anchor = body.get("transition"), body.get("anchor", "keep")
        answer = self.control.submit(PromptRequest(body["prompt"].strip(), transition, body.get("frame"), anchor, source="web"))
        try:
            frame = await asyncio.wait_for(asyncio.wrap_future(answer), ANSWER_TIMEOUT)
        except FifoStreamError as e:
            return web.json_response({"error": str(e)}, status=400)
        except (asyncio.TimeoutError, FutureTimeout):
            return web.json_response({"error": "the run did not take the prompt in time; try again"}, status=503)
        return web.json_response({"frame": frame, "prompt": body["prompt"].strip(), "transition": transition, "anchor": anchor})


def _check_prompt(body) -> str | None:
    """What is wrong with a ``POST /prompt`` body, or None."""
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
        return f"the body must be {PROMPT_BODY} with a non-empty prompt"
    if len(body["prompt"]) > MAX_PROMPT:
        return f"the prompt is over {MAX_PROMPT} characters"
    for name, what in (("transition", "transition must be a whole number of frames >= 0"), ("frame", "frame must be a whole number >= 0, the emitted frame the prompt starts at")):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"{what} (or left out)"
    if body.get("anchor", "keep") not in ANCHOR_POLICIES:
        return 'anchor must be "keep" (the subject anchor holds the look) or "renew" (it takes this prompt\'s look)'
    if set(body) - set(PROMPT_FIELDS):
        return f"unknown field(s) {', '.join(sorted(set(body) - set(PROMPT_FIELDS)))}; send {', '.join(PROMPT_FIELDS)}"
    return None
