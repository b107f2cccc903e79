"""mrad-serve's front door: the Open Inference Protocol over REST and gRPC, and today's routes, over one backend.

REST (aiohttp, on ``--port``) and gRPC (grpc.aio, on ``--grpc-port``) share
one event loop in a thread of their own, and every request goes through the
same steps whichever way it came and whichever backend scores it (the Ray
application or this process, :mod:`.local`): the token, the bounds on size and
arrival time, :mod:`.protocol`'s parsing, the backend, :mod:`.protocol`'s
answer. Routes, relative to the server (the legacy ones under ``/NAME`` for
``--name NAME``)::

    GET  /v2/health/live, /v2/health/ready        open   the server is up, and ready to score
    GET  /v2/models/NAME/ready                    open   the model is ready (also /versions/1/ready)
    GET  /v2                                             server metadata
    GET  /v2/models/NAME                                 model metadata: its inputs and outputs
    POST /v2/models/NAME/infer                           score (also /versions/1/infer)
    POST /predict                                        today's record, or ?map=png the overlay
    GET  /healthz, /readyz                        open   alive; what serves (no paths, no secrets)
    GET  /stats                                          the batches formed

With a token, everything but the routes marked open needs ``Authorization:
Bearer <token>`` (gRPC: the ``authorization`` metadata); the open ones say
nothing a caller could misuse. Headers must arrive within
``header_timeout_s`` (an idle keep-alive connection is closed after as long)
and a body within ``body_timeout_s`` of its headers, at most
``max_body_bytes`` long: a client that trickles bytes holds a socket for
that long and nothing more; the others are answered meanwhile. No answer
carries a traceback: unexpected failures are logged here and answered as a
500 (gRPC INTERNAL) that says so.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import itertools
import json
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web

from ..errors import ImageError, MradError
from . import http, protocol
from . import open_inference_pb as pb
from .backend import Backend
from .protocol import HEADER_LENGTH, Limits, ProtocolError

START_S = 15.0  # binding the ports takes at most this long
STOP_GRACE_S = 2.0  # requests in flight at a stop get this long to be answered
OVERLAYS_AT_ONCE = 1  # ?map=png overlays drawn at once: each costs about 100 bytes a pixel
INLINE_BYTES = 1024 * 1024  # a REST body above this is parsed on a worker thread, not the event loop
log = logging.getLogger("mrad.serve")


@dataclass(frozen=True)
class Listen:
    """Where the front listens and how it is protected."""

    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 8001
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    prefix: str = "/"  # today's routes: / for the default name, /NAME otherwise

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def open_route(handler):
    """A route answered without the token: it says nothing a caller could misuse."""
    handler.open = True
    return handler


def version() -> str:
    try:
        return importlib.metadata.version("mrad-edge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Front:
    """REST and gRPC over ``backend`` from a thread; ``start`` returns once both ports are bound."""

    def __init__(self, backend: Backend, listen: Listen, limits: Limits = Limits()):
        self.backend, self.listen, self.limits = backend, listen, limits
        self.model = backend.model
        self.port, self.grpc_port = listen.port, listen.grpc_port
        self._token = listen.token.encode() if listen.token else None
        self._ssl = tls_context(listen.tls_cert, listen.tls_key) if listen.tls else None
        self._grpc_credentials = (grpc.ssl_server_credentials([(Path(listen.tls_key).read_bytes(),
                                                                Path(listen.tls_cert).read_bytes())])
                                  if listen.tls else None)
        self._requests = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self._overlays: asyncio.Semaphore | None = None
        self._deadlines: dict = {}  # transport -> its HeaderDeadline, until its first request's headers are in

    @property
    def url(self) -> str:
        host = f"[{self.listen.host}]" if ":" in self.listen.host else self.listen.host
        return f"{'https' if self.listen.tls else 'http'}://{host}:{self.port}"

    # -- life ------------------------------------------------------------------------------------

    def start(self) -> "Front":
        self._thread = threading.Thread(target=self._serve, name="mrad-serve-front", daemon=True)
        self._thread.start()
        if not self._started.wait(START_S):
            raise MradError(f"mrad-serve did not start listening on {self.listen.host} within {START_S:.0f} s")
        if self._failure is not None:
            raise MradError(f"mrad-serve cannot listen on {self.listen.host} (--port {self.listen.port}, --grpc-port "
                            f"{self.listen.grpc_port}): {self._failure}")
        return self

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which says it in the user's terms
            self._failure = exc
            self._started.set()
            loop.run_until_complete(self._shut())
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shut())
            left = asyncio.all_tasks(loop)  # the backend's (a batch loop): ended with the loop
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _open(self) -> None:
        self._overlays = asyncio.Semaphore(OVERLAYS_AT_ONCE)
        app = web.Application(middlewares=[self._guard], client_max_size=self.limits.max_body_bytes)
        legacy = self.listen.prefix.rstrip("/")
        name = "{model}"
        app.add_routes([
            web.get("/v2/health/live", self._live),
            web.get("/v2/health/ready", self._ready),
            web.get("/v2", self._server_metadata),
            web.get(f"/v2/models/{name}", self._model_metadata),
            web.get(f"/v2/models/{name}/versions/{{version}}", self._model_metadata),
            web.get(f"/v2/models/{name}/ready", self._model_ready),
            web.get(f"/v2/models/{name}/versions/{{version}}/ready", self._model_ready),
            web.post(f"/v2/models/{name}/infer", self._infer),
            web.post(f"/v2/models/{name}/versions/{{version}}/infer", self._infer),
            web.post(f"{legacy}/predict", self._predict),
            web.get(f"{legacy}/healthz", self._healthz),
            web.get(f"{legacy}/readyz", self._readyz),
            web.get(f"{legacy}/stats", self._stats),
        ])
        # keepalive_timeout: an idle connection waits that long for its next request; auto_decompress off: a
        # compressed body is refused, never inflated past the size bound
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=STOP_GRACE_S,
                                     keepalive_timeout=self.limits.header_timeout_s, auto_decompress=False)
        await self._runner.setup()
        await DeadlineSite(self._runner, self.listen.host, self.listen.port, self._ssl, self.limits.header_timeout_s,
                           self._deadlines).start()
        if self.listen.port == 0:
            self.port = self._runner.addresses[0][1]
        self._grpc = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.limits.max_body_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not shared with another server
            ("grpc.server_handshake_timeout_ms", int(self.limits.header_timeout_s * 1000)),
        ])
        handlers = {method: grpc.unary_unary_rpc_method_handler(
            self._rpc(method), request_deserializer=request.FromString, response_serializer=response.SerializeToString)
            for method, (request, response) in pb.METHODS.items()}
        self._grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.SERVICE, handlers),))
        address = f"[{self.listen.host}]:{self.listen.grpc_port}" if ":" in self.listen.host \
            else f"{self.listen.host}:{self.listen.grpc_port}"
        bound = (self._grpc.add_secure_port(address, self._grpc_credentials) if self._grpc_credentials
                 else self._grpc.add_insecure_port(address))
        if not bound:
            raise MradError(f"gRPC cannot bind {address}")
        self.grpc_port = bound
        await self._grpc.start()

    async def _shut(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(STOP_GRACE_S)
        if self._runner is not None:
            await self._runner.cleanup()

    def close(self, timeout: float = 10.0) -> None:
        """Stop listening, answer what is in flight (STOP_GRACE_S), join the thread."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)

    # -- REST: what every request goes through -----------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        deadline = self._deadlines.get(request.transport)
        if deadline is not None:  # the first request's headers are in: the connection may stay
            deadline.disarm()
        try:
            if not getattr(handler, "open", False):
                self._authorize(request.headers.get("Authorization"))
            return await handler(request)
        except ProtocolError as exc:
            return self._error(exc.status, str(exc))
        except ImageError as exc:  # the request's image: the CLI's own message
            return self._error(400, str(exc))
        except web.HTTPException as exc:  # no such route, or method
            return self._error(exc.status, f"{request.method} {request.path[:200]}: {exc.reason}; see the routes "
                                           "with mrad-serve --help")
        except MradError as exc:  # the bundle, not the request: the operator must act
            return self._error(500, str(exc))
        except Exception:  # noqa: BLE001 - logged here; the caller gets no traceback
            log.exception("mrad-serve: %s %s failed", request.method, request.path[:200])
            return self._error(500, "internal error: mrad-serve's log says more")

    def _authorize(self, given: str | None) -> None:
        if self._token is None:
            return
        scheme, _, value = (given or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ProtocolError("this server needs its token: Authorization: Bearer <token>", 401)
        if not hmac.compare_digest(value.strip().encode(), self._token):
            raise ProtocolError("the bearer token is not this server's", 401)

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        response = web.Response(status=status, body=protocol.error_body(message), content_type="application/json")
        if status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        if status in (408, 413):  # the rest of the body is not read: this connection is done
            response.force_close()
        return response

    async def _body(self, request: web.Request) -> bytes:
        """The body, at most max_body_bytes, arrived within body_timeout_s of the headers."""
        limit = self.limits.max_body_bytes
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise ProtocolError(f"Content-Encoding {request.headers['Content-Encoding'][:32]!r} is not accepted: send "
                                "the body uncompressed")
        if request.content_length is not None and request.content_length > limit:
            raise ProtocolError(f"the body is {request.content_length:,} bytes; at most {limit:,} "
                                "(--max-body-mb)", 413)
        try:
            return await asyncio.wait_for(self._read(request, limit), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(f"the body did not arrive within {self.limits.body_timeout_s:g} s "
                                "(--body-timeout-s)", 408) from None

    @staticmethod
    async def _read(request: web.Request, limit: int) -> bytes:
        chunks, size = [], 0
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"the body is more than {limit:,} bytes (--max-body-mb)", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    # -- REST: the protocol -------------------------------------------------------------------------

    @open_route
    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    @open_route
    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if await self._is_ready() else 400)

    @open_route
    async def _model_ready(self, request: web.Request) -> web.Response:
        self.model.check(request.match_info["model"], request.match_info.get("version", ""))
        return web.Response(status=200 if await self._is_ready() else 400)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(protocol.server_metadata(version()))

    async def _model_metadata(self, request: web.Request) -> web.Response:
        self.model.check(request.match_info["model"], request.match_info.get("version", ""))
        return web.json_response(self.model.metadata())

    async def _infer(self, request: web.Request) -> web.Response:
        self.model.check(request.match_info["model"], request.match_info.get("version", ""))
        body = await self._body(request)
        asked = await off_loop(len(body) > INLINE_BYTES, protocol.rest_request, body,
                               request.headers.get(HEADER_LENGTH), self.model, self.limits)
        found = await self.backend.score(asked.images, asked.want_map)
        payload, headers = await off_loop(asked.want_map, protocol.rest_response, self.model, asked, found,
                                          self.limits)
        return web.Response(body=payload, headers=headers)

    async def _is_ready(self) -> bool:
        try:
            return bool((await self.backend.readiness()).get("ready"))
        except Exception:  # noqa: BLE001 - not ready is the answer
            return False

    # -- REST: today's routes ------------------------------------------------------------------------

    async def _predict(self, request: web.Request) -> web.Response:
        frame = http.frame_number(request.query.get("frame"))
        source = http.label(request.query.get("source"), "?source=", "http")
        png = request.query.get("map") == "png"
        image = http.image_bytes(await self._body(request), request.headers.get("Content-Type"),
                                 self.limits.max_form_parts)
        [found] = await self.backend.score([image], want_map=png)
        record = http.record(found, next(self._requests) if frame is None else frame, source)
        headers = {"X-Mrad-Batch-Size": str(found.batch_size), "X-Mrad-Node": found.node,
                   "X-Mrad-Pid": str(found.pid)}
        if png:
            async with self._overlays:
                picture = await asyncio.get_running_loop().run_in_executor(None, http.overlay_png, image,
                                                                           found.result.anomaly_map)
            return web.Response(body=picture, content_type="image/png",
                                headers={**headers, "X-Mrad-Record": json.dumps(record)})
        return web.json_response(record, headers=headers)

    @open_route
    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    @open_route
    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(await self.backend.readiness())
        except ProtocolError as exc:
            return self._error(503, str(exc))

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(await self.backend.stats())

    # -- gRPC ------------------------------------------------------------------------------------

    def _rpc(self, method: str):
        serve = getattr(self, f"_grpc_{method}")
        needs_token = method not in ("ServerLive", "ServerReady", "ModelReady")

        async def handle(request, context):
            try:
                if needs_token:
                    self._authorize(dict(context.invocation_metadata()).get("authorization"))
                return await serve(request)
            except ProtocolError as exc:
                code, message = exc.grpc_code, str(exc)
            except ImageError as exc:
                code, message = "INVALID_ARGUMENT", str(exc)
            except MradError as exc:
                code, message = "INTERNAL", str(exc)
            except Exception:  # noqa: BLE001 - logged here; the caller gets no traceback
                log.exception("mrad-serve: gRPC %s failed", method)
                code, message = "INTERNAL", "internal error: mrad-serve's log says more"
            await context.abort(getattr(grpc.StatusCode, code), message)

        return handle

    async def _grpc_ServerLive(self, request):
        return pb.ServerLiveResponse(live=True)

    async def _grpc_ServerReady(self, request):
        return pb.ServerReadyResponse(ready=await self._is_ready())

    async def _grpc_ModelReady(self, request):
        self.model.check(request.name, request.version)
        return pb.ModelReadyResponse(ready=await self._is_ready())

    async def _grpc_ServerMetadata(self, request):
        found = protocol.server_metadata(version())
        return pb.ServerMetadataResponse(name=found["name"], version=found["version"], extensions=found["extensions"])

    async def _grpc_ModelMetadata(self, request):
        self.model.check(request.name, request.version)
        found = self.model.metadata()
        answer = pb.ModelMetadataResponse(name=found["name"], versions=found["versions"], platform=found["platform"])
        for spec in found["inputs"]:
            answer.inputs.add(**spec)
        for spec in found["outputs"]:
            answer.outputs.add(**spec)
        return answer

    async def _grpc_ModelInfer(self, request):
        asked = protocol.grpc_request(request, self.model, self.limits)  # numpy views of the message's bytes
        found = await self.backend.score(asked.images, asked.want_map)
        return await off_loop(asked.want_map, protocol.grpc_response, self.model, asked, found)


async def off_loop(large: bool, function, *args):
    """``function(*args)``, on a worker thread when its input or answer is large (a JSON body of many megabytes,
    maps to write): the event loop keeps answering the other clients meanwhile."""
    if not large:
        return function(*args)
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


class HeaderDeadline(asyncio.Protocol):
    """aiohttp's protocol for one connection, closed unless its first request's headers arrive within ``seconds``.

    aiohttp bounds the size of headers but (before 3.14) not how long they take: a client sending one byte at
    a time would hold its connection for good. Later requests on the connection wait at most the keep-alive
    timeout, which aiohttp enforces itself.
    """

    def __init__(self, inner: asyncio.Protocol, seconds: float, registry: dict):
        self.inner, self.seconds, self.registry = inner, seconds, registry
        self.transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.registry[transport] = self
        self._timer = asyncio.get_running_loop().call_later(self.seconds, transport.close)
        self.inner.connection_made(transport)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.registry.pop(self.transport, None)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def connection_lost(self, exc) -> None:
        self.disarm()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class DeadlineSite(web.BaseSite):
    """aiohttp's TCP site, each connection behind a :class:`HeaderDeadline` (and its TLS handshake as bounded)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, ssl_context, header_timeout_s: float,
                 registry: dict):
        super().__init__(runner, ssl_context=ssl_context)
        self.host, self.port, self.header_timeout_s, self.registry = host, port, header_timeout_s, registry

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        factory = self._runner.server
        tls = {"ssl": self._ssl_context, "ssl_handshake_timeout": self.header_timeout_s} if self._ssl_context else {}
        self._server = await asyncio.get_running_loop().create_server(
            lambda: HeaderDeadline(factory(), self.header_timeout_s, self.registry), self.host, self.port,
            reuse_address=True, **tls)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The REST side's TLS: the certificate chain and key files, TLS 1.2 or newer."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise MradError(f"--tls-cert {cert} / --tls-key {key} cannot be used: {exc}") from None
    return context
