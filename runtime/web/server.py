"""The operator's page over HTTP: aiohttp in a thread of its own, beside the inspection loop.

Routes (reading needs nothing; changing needs the token, else 403):

    GET  /                         the page (static files shipped in the package, no build step)
    GET  /api/state                everything the page shows, as JSON
    GET  /api/events               Server-Sent Events: the state and new scores, PUSH_S apart
    GET  /api/frames/{id}.jpg      a held frame, ?show=overlay (with its heatmap, the default) or image
    GET  /api/latest.jpg?source=S  source S's latest frame at the time of asking (its id in X-Frame-Id), ?show= too
    POST /api/frames/{id}/enroll   {"label": "normal" | "defect", "operator": ..., "region": [x0, y0, x1, y1]?}
    POST /api/undo                 {"operator": ...}: the enrollment's rollback
    POST /api/threshold            {"operator": ..., "recalibrate": true, "quantile": 0.99} or {"operator": ..., "value": x}
    POST /api/recipe               {"operator": ..., "recipe": NAME}: change over from the next frame

The token goes in ``Authorization: Bearer <token>``. A browser that stops
reading its event stream only fills its own bounded mailbox (see
:mod:`~mrad.runtime.web.view`); one whose socket stays full for STALL_S
is disconnected.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import threading
from pathlib import Path

from aiohttp import web

from ..formats.calibration import DEFAULT_QUANTILE
from ..errors import MradError
from .teach import NotHeld, Teacher
from .view import PICTURES, LineView

STATIC = Path(__file__).with_name("static")
LOOPBACK = "127.0.0.1"
PUSH_S = 0.2  # how often a browser's event stream gets what changed
STALL_S = 10.0  # a browser whose socket accepts nothing for this long is disconnected
START_S = 10.0  # binding the port takes at most this long
KEEPALIVE_PUSHES = 25  # an idle stream gets a comment line every this many pushes, so proxies keep it open


def parse_address(text: str) -> tuple[str, int]:
    """``PORT`` (on loopback), ``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    text = str(text).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = LOOPBACK, text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise MradError(f"--web {text!r}: expected PORT or HOST:PORT (loopback unless a host is given), "
                        "e.g. 8080 or 127.0.0.1:8080")
    return host, int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class PageServer:
    """Serves ``view`` and ``teacher`` on ``host:port`` from a thread; ``start`` returns once the port is bound."""

    def __init__(self, view: LineView, teacher: Teacher, host: str, port: int, token: str):
        if not token:
            raise MradError("the operator page needs a token for changes")
        self.view, self.teacher, self.host, self.port, self.token = view, teacher, host, port, token
        self.served = 0  # event streams opened
        self.dropped = 0  # messages dropped for browsers that did not keep up (streams closed so far)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # -- life ------------------------------------------------------------------------------------

    def start(self) -> "PageServer":
        self._thread = threading.Thread(target=self._serve, name="mrad-web", daemon=True)
        self._thread.start()
        if not self._started.wait(START_S):
            raise MradError(f"the operator page did not start on {self.host}:{self.port} within {START_S:.0f} s")
        if self._failure is not None:
            raise MradError(f"the operator page cannot listen on {self.host}:{self.port}: {self._failure}")
        return self

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which says it in the user's terms
            self._failure = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._runner.cleanup())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _open(self) -> None:
        self._closing = asyncio.Event()
        app = web.Application(middlewares=[self._guard])
        app.add_routes([
            web.get("/", self._index),
            web.get("/api/state", self._state),
            web.get("/api/events", self._events),
            web.get(r"/api/frames/{id:\d+}.jpg", self._picture),
            web.get("/api/latest.jpg", self._picture),
            web.post(r"/api/frames/{id:\d+}/enroll", self._enroll),
            web.post("/api/undo", self._undo),
            web.post("/api/threshold", self._threshold),
            web.post("/api/recipe", self._recipe),
            web.static("/static", STATIC),
        ])
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:  # a free port was asked for (tests): say which
            self.port = self._runner.addresses[0][1]

    def close(self, timeout: float = 5.0) -> None:
        """End every event stream, stop serving and join the thread (within ``timeout`` seconds)."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            return

        def stop() -> None:
            self._closing.set()
            loop.call_later(PUSH_S * 2, loop.stop)  # the streams see the flag on their next push and end

        loop.call_soon_threadsafe(stop)
        self._thread.join(timeout)

    # -- requests --------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """Changes need the token; every answer is fresh (the page polls nothing from a cache)."""
        if request.method not in ("GET", "HEAD"):
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                return web.json_response({"error": "this change needs the operator token (Authorization: Bearer "
                                                   "<token>); mrad-run printed it at start"}, status=403)
        response = await handler(request)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    def state(self) -> dict:
        return {**self.view.snapshot(), **self.teacher.state()}

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        mailbox = self.view.subscribe()
        self.served += 1
        try:
            await self._send(response, "state", self.state())
            pushes, changes = 0, self.teacher.audit.appended
            while not self._closing.is_set():
                try:
                    await asyncio.wait_for(self._closing.wait(), PUSH_S)
                    break
                except asyncio.TimeoutError:
                    pass
                scores = self.view.take(mailbox)
                pushes += 1
                if scores or changes != self.teacher.audit.appended:  # new frames, or another browser's change
                    changes = self.teacher.audit.appended
                    await self._send(response, "update", {**self.view.snapshot(history=False),
                                                          **self.teacher.state(), "new": scores,
                                                          "skipped": mailbox.dropped})
                elif pushes % KEEPALIVE_PUSHES == 0:
                    await asyncio.wait_for(response.write(b": idle\n\n"), STALL_S)
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            pass  # the browser went away or stalled: its mailbox goes with it
        finally:
            self.view.unsubscribe(mailbox)
            self.dropped += mailbox.dropped
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, event: str, data: dict) -> None:
        payload = f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
        await asyncio.wait_for(response.write(payload), STALL_S)

    async def _picture(self, request: web.Request) -> web.Response:
        show = request.query.get("show", "overlay")
        if show not in PICTURES:
            return web.json_response({"error": f"show must be one of {', '.join(PICTURES)}"}, status=400)
        if "id" in request.match_info:
            held = self.view.get(int(request.match_info["id"]))
        else:
            held = self.view.latest(request.query.get("source", ""))
        if held is None:
            return web.json_response({"error": "that frame is no longer held"}, status=404)
        body = await asyncio.get_running_loop().run_in_executor(None, held.jpeg, show)
        return web.Response(body=body, content_type="image/jpeg", headers={"X-Frame-Id": str(held.id)})

    async def _enroll(self, request: web.Request) -> web.Response:
        body = await _json(request)
        return await self._change(self.teacher.enroll, int(request.match_info["id"]), body.get("label"),
                                  body.get("operator"), body.get("region"))

    async def _undo(self, request: web.Request) -> web.Response:
        return await self._change(self.teacher.undo, (await _json(request)).get("operator"))

    async def _threshold(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if body.get("recalibrate"):
            return await self._change(self.teacher.recalibrate, body.get("operator"),
                                      body.get("quantile", DEFAULT_QUANTILE))
        return await self._change(self.teacher.set_threshold, body.get("operator"), body.get("value"))

    async def _recipe(self, request: web.Request) -> web.Response:
        body = await _json(request)
        return await self._change(self.teacher.activate, body.get("operator"), body.get("recipe"))

    async def _change(self, action, *args) -> web.Response:
        """Run a change in a worker thread (encoding takes a while), then answer with it and the new state."""
        try:
            done = await asyncio.get_running_loop().run_in_executor(None, action, *args)
        except NotHeld as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except MradError as exc:  # a bad request, or one the line's state refuses (nothing to undo)
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"done": done, "state": self.state()})


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"the request's body is not JSON: {exc}"}),
                                 content_type="application/json") from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "the request's body must be a JSON object"}),
                                 content_type="application/json")
    return body
