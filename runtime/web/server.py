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

The token goes in ``Authorization: Bearer <token>``; a client that sends
wrong ones is slowed down (429). A browser that stops reading its event
stream only fills its own bounded mailbox (see :mod:`~mrad.runtime.web.view`);
one whose socket stays full for STALL_S is disconnected.

Every answer is JSON (or the page's files, or a JPEG), never a traceback, and
passes through :func:`~mrad.runtime.web.redact.public`: no credentials, no
long paths. Connections, event streams, host names, request sizes and times,
token guesses: each is bounded as :mod:`~mrad.runtime.web.guard` says.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import threading
import time
from pathlib import Path

from aiohttp import web

from ..formats.calibration import DEFAULT_QUANTILE
from ..errors import MradError
from .audit import AuditError
from .guard import Gate, GatedHandler, Guesses, Hosts, Limits, Tally, echoed
from .redact import public
from .teach import NotHeld, Teacher
from .view import PICTURES, LineView

STATIC = Path(__file__).with_name("static")
LOOPBACK = "127.0.0.1"
PUSH_S = 0.2  # how often a browser's event stream gets what changed
STALL_S = 10.0  # a browser whose socket accepts nothing for this long is disconnected
START_S = 10.0  # binding the port takes at most this long
KEEPALIVE_PUSHES = 25  # an idle stream gets a comment line every this many pushes, so proxies keep it open
SHARED_S = PUSH_S / 2  # what every stream is sent is made at most this often, for all of them together
BACKLOG = 128  # connections waiting to be accepted
SECURITY_HEADERS = {
    "Cache-Control": "no-store",  # every answer is fresh: the page polls nothing from a cache
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # no page elsewhere frames this one to steer the operator's clicks
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}
log = logging.getLogger(__name__)
# aiohttp's word on each malformed request (with its traceback): the request is answered 400, and a client
# elsewhere must not fill the operator's terminal with them.
quiet = logging.getLogger(__name__ + ".requests")
quiet.setLevel(logging.CRITICAL + 1)


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
    """Serves ``view`` and ``teacher`` on ``host:port`` from a thread; ``start`` returns once the port is bound.

    ``hosts``: names the page may be reached by beyond its address (``--web-host``); ``limits``: its bounds.
    """

    def __init__(self, view: LineView, teacher: Teacher, host: str, port: int, token: str,
                 hosts: tuple[str, ...] = (), limits: Limits = Limits()):
        if not token:
            raise MradError("the operator page needs a token for changes")
        self.view, self.teacher, self.host, self.port, self.token = view, teacher, host, port, token
        self.limits, self.extra_hosts = limits, tuple(hosts)
        self.gate = Gate(limits)
        self.streams = Tally(limits.streams, limits.streams_per_client, "event streams")
        self.guesses = Guesses(limits)
        self.hosts = Hosts(host, port, self.extra_hosts)
        self.served = 0  # event streams opened
        self.dropped = 0  # messages dropped for browsers that did not keep up (streams closed so far)
        self._shared: tuple[float, int, str] | None = None  # (made at, audit entries then, the update as JSON)
        self._tick: asyncio.Future | None = None  # every stream waits on it: one clock for all of them
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
            _cancel_left(loop)  # a connection still lingering over a body it was refused: ended, not abandoned
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _open(self) -> None:
        self._closing = asyncio.Event()
        self._tick = asyncio.get_running_loop().create_future()
        asyncio.ensure_future(self._beat())  # ended with the loop (_cancel_left)
        app = web.Application(middlewares=[self._guard], client_max_size=self.limits.body_bytes)
        app.on_response_prepare.append(_security_headers)
        app.add_routes([
            web.get("/", self._index),
            web.get("/api/state", self._state),
            web.get("/api/events", self._events, allow_head=False),
            web.get(r"/api/frames/{id:\d{1,12}}.jpg", self._picture),
            web.get("/api/latest.jpg", self._picture),
            web.post(r"/api/frames/{id:\d{1,12}}/enroll", self._enroll),
            web.post("/api/undo", self._undo),
            web.post("/api/threshold", self._threshold),
            web.post("/api/recipe", self._recipe),
            web.static("/static", STATIC),
        ])
        limits = self.limits  # the headers' time is aiohttp's keep-alive: it also runs before the first request
        options = dict(access_log=None, logger=quiet, keepalive_timeout=limits.header_s,
                       max_line_size=limits.line_bytes, max_field_size=limits.line_bytes, max_headers=limits.headers,
                       lingering_time=limits.body_s)  # a body refused unread is drained this long at most
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0, **options)
        await self._runner.setup()
        server, loop = self._runner.server, asyncio.get_running_loop()
        site = GatedSite(self._runner, self.host, self.port,
                         lambda: GatedHandler(self.gate, server, loop=loop, **options))
        await site.start()
        if self.port == 0:  # a free port was asked for (tests): say which
            self.port = self._runner.addresses[0][1]
        self.hosts.port = self.port

    def close(self, timeout: float = 5.0) -> None:
        """End every event stream, stop serving and join the thread (within ``timeout`` seconds)."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            return

        def stop() -> None:
            self._closing.set()
            self._next_tick()  # the streams see the flag now and end
            loop.call_later(PUSH_S * 2, loop.stop)

        loop.call_soon_threadsafe(stop)
        self._thread.join(timeout)

    # -- requests --------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """The host named, the origin, the token for changes; every answer JSON, never a traceback."""
        try:
            refusal = self._refusal(request)
            return refusal if refusal is not None else await handler(request)
        except web.HTTPException as exc:  # aiohttp's own (404, 405, 413) and ours: said as JSON
            if exc.content_type == "application/json":
                return web.Response(status=exc.status, text=exc.text, content_type="application/json")
            return _answer({"error": exc.reason}, exc.status)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # noqa: BLE001 - the page's own mistake: logged here, never sent
            log.exception("the operator page failed on %s %s", request.method, request.path)
            return _answer({"error": "the page failed on this request (the server's log says why)"}, 500)

    def _refusal(self, request: web.Request) -> web.Response | None:
        local = _local_address(request)
        host = request.headers.get("Host", "")
        if not self.hosts.allows(host, local):
            return _answer({"error": f"this page does not answer to the host {echoed(host)}: use its address, "
                                     "or give the name to mrad-run with --web-host"}, 421)
        origin = request.headers.get("Origin")
        if origin is not None and not self.hosts.allows_origin(origin, local):
            return _answer({"error": f"requests from the page at {echoed(origin)} are refused"}, 403)
        if request.method in ("GET", "HEAD"):
            return None
        client = request.remote or "?"
        wait = self.guesses.allowed(client)
        if wait:
            return _answer({"error": f"too many wrong tokens from {client}: try again in {math.ceil(wait)} s"}, 429,
                           headers={"Retry-After": str(math.ceil(wait))})
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(errors="replace"),
                                                                 self.token.encode()):
            self.guesses.failed(client)
            return _answer({"error": "this change needs the operator token (Authorization: Bearer <token>); "
                                     "mrad-run printed it at start"}, 403)
        return None

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    def state(self) -> dict:
        """Everything the page shows, as anyone who can reach it may see it."""
        return public({**self.view.snapshot(), **self.teacher.state()})

    def shared_update(self) -> str:
        """What every event stream is sent beside its own new scores, as JSON: made once for all of them, SHARED_S
        apart (and again at once after a change)."""
        now, changes = time.monotonic(), self.teacher.audit.appended
        if self._shared is None or now - self._shared[0] > SHARED_S or self._shared[1] != changes:
            state = public({**self.view.snapshot(history=False), **self.teacher.state()})
            self._shared = (now, changes, json.dumps(state))
        return self._shared[2]

    async def _beat(self) -> None:
        """Wake every stream PUSH_S apart with one tick: no timer per stream."""
        while not self._closing.is_set():
            await asyncio.sleep(PUSH_S)
            self._next_tick()

    def _next_tick(self) -> None:
        tick, self._tick = self._tick, asyncio.get_running_loop().create_future()
        if not tick.done():
            tick.set_result(None)

    async def _state(self, request: web.Request) -> web.Response:
        return _answer(self.state())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        client = request.remote or "?"
        why = self.streams.take(client)
        if why is not None:
            refused = _answer({"error": f"no event stream for now: {why}"}, 503, headers={"Retry-After": "5"})
            refused.force_close()
            return refused
        try:
            return await self._stream(request)
        finally:
            self.streams.give(client)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        mailbox = self.view.subscribe()
        self.served += 1
        try:
            await self._send(response, "state", json.dumps(self.state()))
            pushes, changes = 0, self.teacher.audit.appended
            while not self._closing.is_set():
                await self._tick
                if self._closing.is_set():
                    break
                scores = self.view.take(mailbox)
                pushes += 1
                if scores or changes != self.teacher.audit.appended:  # new frames, or another browser's change
                    changes = self.teacher.audit.appended
                    own = json.dumps({"new": scores, "skipped": mailbox.dropped})
                    await self._send(response, "update", own[:-1] + ", " + self.shared_update()[1:])  # one object
                elif pushes % KEEPALIVE_PUSHES == 0:
                    await asyncio.wait_for(response.write(b": idle\n\n"), STALL_S)
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            pass  # the browser went away or stalled: its mailbox goes with it
        finally:
            self.view.unsubscribe(mailbox)
            self.dropped += mailbox.dropped
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, event: str, data: str) -> None:
        payload = f"event: {event}\ndata: {data}\n\n".encode()
        await asyncio.wait_for(response.write(payload), STALL_S)

    async def _picture(self, request: web.Request) -> web.Response:
        show = request.query.get("show", "overlay")
        if show not in PICTURES:
            return _answer({"error": f"show must be one of {', '.join(PICTURES)}"}, 400)
        if "id" in request.match_info:
            held = self.view.get(int(request.match_info["id"]))
        else:
            held = self.view.latest(request.query.get("source", ""))
        if held is None:
            return _answer({"error": "that frame is no longer held"}, 404)
        body = await asyncio.get_running_loop().run_in_executor(None, held.jpeg, show)
        return web.Response(body=body, content_type="image/jpeg", headers={"X-Frame-Id": str(held.id)})

    async def _enroll(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        return await self._change(self.teacher.enroll, int(request.match_info["id"]), body.get("label"),
                                  body.get("operator"), body.get("region"))

    async def _undo(self, request: web.Request) -> web.Response:
        return await self._change(self.teacher.undo, (await self._json(request)).get("operator"))

    async def _threshold(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        if body.get("recalibrate"):
            return await self._change(self.teacher.recalibrate, body.get("operator"),
                                      body.get("quantile", DEFAULT_QUANTILE))
        return await self._change(self.teacher.set_threshold, body.get("operator"), body.get("value"))

    async def _recipe(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        return await self._change(self.teacher.activate, body.get("operator"), body.get("recipe"))

    async def _change(self, action, *args) -> web.Response:
        """Run a change in a worker thread (encoding takes a while), then answer with it and the new state."""
        try:
            done = await asyncio.get_running_loop().run_in_executor(None, action, *args)
        except NotHeld as exc:
            return _answer({"error": str(exc)}, 404)
        except AuditError as exc:  # its request could not be recorded: it was not applied
            return _answer({"error": f"nothing was changed: {exc}", "applied": False}, 503)
        except MradError as exc:  # a bad request, or one the line's state refuses (nothing to undo)
            return _answer({"error": str(exc)}, 400)
        return _answer({"done": done, "state": self.state()})

    async def _json(self, request: web.Request) -> dict:
        """The request's body, a JSON object, read within the body's time and size bounds."""
        try:
            raw = await asyncio.wait_for(request.read(), self.limits.body_s)
        except asyncio.TimeoutError:
            raise _error(web.HTTPRequestTimeout,
                         f"the request's body did not arrive within {self.limits.body_s:g} s") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise _error(web.HTTPBadRequest, "the request's body is not JSON") from None
        if not isinstance(body, dict):
            raise _error(web.HTTPBadRequest, "the request's body must be a JSON object")
        return body


class GatedSite(web.BaseSite):
    """A TCP site whose connections are made by ``factory`` (a :class:`~.guard.GatedHandler` each)."""

    __slots__ = ("_host", "_port", "_factory")

    def __init__(self, runner: web.AppRunner, host: str, port: int, factory):
        super().__init__(runner, backlog=BACKLOG)
        self._host, self._port, self._factory = host, port, factory

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(self._factory, self._host, self._port,
                                                                      backlog=self._backlog)


def _cancel_left(loop: asyncio.AbstractEventLoop) -> None:
    left = asyncio.all_tasks(loop)
    for task in left:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))


def _answer(data: dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.json_response(public(data), status=status, headers=headers)


def _error(kind, message: str) -> web.HTTPException:
    return kind(text=json.dumps(public({"error": message})), content_type="application/json")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _local_address(request: web.Request) -> str | None:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return str(sockname[0]) if isinstance(sockname, (tuple, list)) and sockname else None
