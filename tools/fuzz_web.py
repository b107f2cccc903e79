"""mrad fuzz of the operator's page: hostile HTTP against every route, each answer checked.

    python -m mrad.tools.fuzz_web --bundle bundles/tiny --cases 5000 --slow 8 --seed 0

Starts the page (loopback, a free port; the real bounds, with shorter times
so that slow clients are cut within seconds) over a copy of the bundle and
shows it a few scored frames: one source named by an absolute path, one by a
camera URL with a password, an event naming a webhook with credentials, so
that leaks can be looked for. Then sends ``--cases`` requests, one at a
time, from a handful of loopback addresses, each built at random:

- a method: GET, HEAD, POST, others (PUT, DELETE, OPTIONS, PATCH, TRACE), junk;
- a path: each route, mutated (other ids, huge numbers, traversal, encoded
  bytes, a query of junk), or junk;
- headers: Host right, foreign or missing; Origin none, the page's, foreign or
  ``null``; the token right, wrong, mangled or absent; a Content-Length that
  lies or is no number; chunked bodies, whole or broken; many or long headers;
- a body: a change of the right shape with hostile values (operator names as
  objects, lists, 65 characters, control characters; NaN, huge numbers,
  strings for numbers; regions of any shape), random bytes, deep nesting,
  more than the page takes;
- how it is sent: whole, cut short (then the connection is closed), or
  dribbled in pieces.

Meanwhile ``--slow`` clients each hold a connection by sending a byte at a
time (headers, or a body), again and again; at the start and the end the
page is flooded with more connections than it serves.

Failures: ``traceback`` (an answer holds a Python traceback), ``leak`` (an
answer holds the token, a credential the page was shown, or an absolute path
of the data or bundle folders or of the source), ``server error`` (a 500:
the page failed on a request), ``change without the token`` (a change
answered 2xx, or the line's threshold, enrollment or recipe changed, while
the token, the Host or the Origin was wrong), ``foreign host answered`` (a
2xx to a foreign Host or Origin), ``hang`` (no answer to a request sent whole
within the time bounds; a change with the token is work, and is given
CHANGE_S), ``held too long`` (a slow client still connected past its
bound), ``over the limit`` (the page held more connections than its limit,
or a flood was not refused), ``down`` (the page stopped answering),
``audit`` (the audit log does not verify, or a change has no result entry).
The exit code is 1 when any case failed; ``--failures FILE`` keeps each
failing case (its request, as sent) for reproduction.
"""

from __future__ import annotations

import collections
import json
import random
import selectors
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from mrad.runtime.core.detector import Detector
from mrad.runtime.line.records import now
from mrad.runtime.line.station import Station
from mrad.runtime.web import OperatorPage, new_token
from mrad.runtime.web.audit import verify
from mrad.runtime.web.guard import Limits

LIMITS = Limits(header_s=1.0, body_s=1.0, guess_every_s=0.05)  # the real bounds; times short, guesses refilled fast
HANG_SLACK_S = 5.0  # beyond the page's own time bounds, what a loaded machine may add
CHANGE_S = 120.0  # a change with the token is work, not a bound: an enrollment re-measures over every good part
CLIENTS = 16  # loopback addresses the cases come from (127.0.0.2 ...): one client's guesses do not stop all
FRAMES = 6  # frames shown to the page before the cases
SLOW_GAP_S = 0.1  # a slow client sends one byte this often
FLOOD_EXTRA = 50  # a flood: this many connections beyond the page's limit
PROBE_EVERY = 50  # the page is asked for its state after every this many cases
SHAPE = (64, 64, 3)
SECRET_DIR = "fuzz-secret-layout"  # a folder of the source's path: shown, it would be a path leaked
SECRET_PASSWORD = "fuzz-secret-pw"
SECRET_QUERY = "fuzz-secret-tk"
SOURCE_PATH = f"/srv/{SECRET_DIR}/line3/cam1.avi"
CAMERA_URL = f"rtsp://operator:{SECRET_PASSWORD}@10.0.0.5/stream"
WEBHOOK = f"webhook http://mes:{SECRET_PASSWORD}@10.0.0.9/api/defects?token={SECRET_QUERY}"
TRACEBACK_MARKS = (b"Traceback (most recent call last)", b'File "/')
CHANGES = ("/api/undo", "/api/threshold", "/api/recipe")
READS = ("/", "/api/state", "/api/events", "/api/latest.jpg", "/static/app.js", "/static/style.css")
MUTATIONS = ("method", "path", "host", "origin", "auth", "body", "mode", "length", "junk", "chunked")
METHODS = ("GET",) * 7 + ("POST",) * 7 + ("HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "get", "BREW",
                                         "G\x00T", "POST /x")


@dataclass
class Case:
    """One request as it is sent, and what it should be allowed to do."""

    client: str
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    mode: str  # whole, cut, dribble
    authorized: bool  # the right token, the right host, no foreign origin, a change's method and route
    foreign: bool  # a foreign Host or Origin

    def raw(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1"] + [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + self.body

    def said(self) -> dict:
        return {"client": self.client, "mode": self.mode, "request": self.raw()[:4096].decode("latin-1")}


@dataclass
class Answer:
    status: int | None = None  # None: the connection closed (or timed out) without a status line
    body: bytes = b""
    seconds: float = 0.0
    timed_out: bool = False


@dataclass
class Report:
    cases: int = 0
    seconds: float = 0.0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: collections.Counter = field(default_factory=collections.Counter)
    examples: list[dict] = field(default_factory=list)
    applied: int = 0
    slow: dict = field(default_factory=lambda: {"connections": 0, "longest_s": 0.0})
    floods: list[dict] = field(default_factory=list)
    audit: dict = field(default_factory=dict)

    def fail(self, kind: str, case: Case | None, detail: str) -> None:
        self.failures[kind] += 1
        if len(self.examples) < 50:
            self.examples.append({"failure": kind, "detail": detail[:500], **(case.said() if case else {})})

    def summary(self) -> dict:
        return {"cases": self.cases, "seconds": round(self.seconds, 1),
                "cases_per_s": round(self.cases / self.seconds, 1) if self.seconds else 0.0,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0]))},
                "failures": dict(self.failures), "applied": self.applied, "slow": self.slow, "floods": self.floods,
                "audit": self.audit}


# -- the page under test ------------------------------------------------------------------------


class Target:
    """The page over a copy of the bundle, shown a few frames; its state read directly to catch changes."""

    def __init__(self, bundle: Path, folder: Path, limits: Limits):
        self.folder = folder
        copy = shutil.copytree(bundle, folder / "bundle")
        self.detector = Detector(copy, provider="cpu")
        self.station = Station.single(self.detector, threshold=0.5)
        self.token = new_token()
        self.page = OperatorPage(self.station, ("127.0.0.1", 0), self.token, folder / "operator",
                                 sources={"cam1": (SOURCE_PATH,), CAMERA_URL: (CAMERA_URL,)}, limits=limits)
        self.port = self.page.server.port
        self.secrets = [self.token.encode(), SECRET_DIR.encode(), SECRET_PASSWORD.encode(), SECRET_QUERY.encode(),
                        str(folder).encode()]
        self._show_frames()

    def _show_frames(self) -> None:
        rng = np.random.default_rng(0)
        for number in range(FRAMES):
            image = rng.integers(0, 256, SHAPE, dtype=np.uint8)
            result = self.station.predict(image)
            record = {"source": SOURCE_PATH if number % 2 else CAMERA_URL, "frame": number, "timestamp": now(),
                      "score": result.score, "decision": "anomalous", "latency_ms": 1.0, "recipe": "default",
                      "scored_by": {"threshold": 0.5}}
            self.page.write(record, None, frame=image, anomaly_map=result.anomaly_map)
        self.page.write({"event": "sink_lost", "timestamp": now(), "sink": WEBHOOK,
                         "error": f"cannot write {self.folder}/spool/records.jsonl"})

    def state(self) -> tuple:
        recipe = self.station.recipe()
        return recipe.policy.threshold, self.detector.enrollment_version, self.station.active

    def held_ids(self) -> list[int]:
        return list(self.page.view.held)

    def close(self) -> None:
        self.page.close(5)


# -- making cases ----------------------------------------------------------------------------------


class Maker:
    """Random requests for one page, from one seed."""

    def __init__(self, rng: random.Random, target: Target, clients: list[str]):
        self.rng, self.target, self.clients = rng, target, clients
        self.port = target.port

    def case(self) -> Case:
        """A well-formed request (a read, or a change with the token), then up to MUTATIONS things made hostile."""
        rng = self.rng
        change = rng.random() < 0.5
        held = self.target.held_ids() or [1]
        route = (rng.choice(CHANGES + (f"/api/frames/{rng.choice(held)}/enroll",)) if change else
                 rng.choice(READS + (f"/api/frames/{rng.choice(held)}.jpg",)))
        parts = {"method": "POST" if change else "GET", "path": route, "host": (f"127.0.0.1:{self.port}", False),
                 "origin": (f"http://127.0.0.1:{self.port}", False) if change else (None, False),
                 "auth": (True, f"Bearer {self.target.token}") if change else (False, None),
                 "body": json.dumps(self._change(route, hostile=False)).encode() if change else b"",
                 "mode": "whole", "length": None, "junk": [], "chunked": False}
        for name in rng.sample(MUTATIONS, rng.choice((0, 1, 1, 1, 2, 3))):
            self._mutate(parts, name)
        return self._assemble(parts)

    def _mutate(self, parts: dict, name: str) -> None:
        rng = self.rng
        if name == "method":
            parts["method"] = rng.choice(METHODS)
        elif name == "path":
            parts["path"] = self._path()
        elif name == "host":
            parts["host"] = self._host()
        elif name == "origin":
            parts["origin"] = self._origin()
        elif name == "auth":
            parts["auth"] = self._auth()
        elif name == "body":
            parts["body"] = self._body(parts["path"])
        elif name == "mode":
            parts["mode"] = rng.choice(("cut", "dribble"))
        elif name == "length":
            parts["length"] = self._length(parts["body"])
        elif name == "junk":
            parts["junk"] = self._junk_headers()
        elif name == "chunked":
            parts["chunked"] = True

    def _assemble(self, parts: dict) -> Case:
        (host, foreign_host), (origin, foreign_origin) = parts["host"], parts["origin"]
        token_right, auth = parts["auth"]
        body = self._chunked(parts["body"]) if parts["chunked"] else parts["body"]
        headers = ([("Host", host)] if host is not None else []) + ([("Origin", origin)] if origin else [])
        headers += [("Authorization", auth)] if auth is not None else []
        if parts["chunked"]:
            headers.append(("Transfer-Encoding", "chunked"))
        elif parts["length"] is not None:
            headers += parts["length"]
        elif body:
            headers.append(("Content-Length", str(len(body))))
        headers += parts["junk"] or [("Connection", "close")]
        path, method = parts["path"], parts["method"]
        change = method == "POST" and (path.split("?")[0] in CHANGES or path.endswith("/enroll"))
        authorized = change and token_right and not (foreign_host or foreign_origin)
        return Case(self.rng.choice(self.clients), method, path, headers, body, parts["mode"], authorized,
                    foreign_host or foreign_origin)

    def _path(self) -> str:
        rng = self.rng
        held = self.target.held_ids() or [1]
        choices = [rng.choice(READS), rng.choice(CHANGES), f"/api/frames/{rng.choice(held)}.jpg",
                   f"/api/frames/{rng.choice(held)}/enroll", f"/api/frames/{rng.randrange(10 ** 18)}/enroll",
                   f"/api/frames/{'9' * rng.randrange(1, 5000)}.jpg", "/static/../../../../etc/passwd",
                   "/static/%2e%2e/%2e%2e/server.py", "/api/latest.jpg?source=" + rng.choice(["cam1", "%00", "x" * 3000]),
                   "/api/frames/1.jpg?show=" + rng.choice(["image", "overlay", "raw", "%ff"]),
                   "/" + "".join(rng.choice("abc/%.?#&=~\\") for _ in range(rng.randrange(1, 60))),
                   "/api/state?" + "&".join(f"k{i}=v" for i in range(rng.randrange(1, 300))), "*", "",
                   "http://evil.example/api/state", "/api/events?retry=" + "9" * rng.randrange(1, 40)]
        return rng.choice(choices)

    def _host(self) -> tuple[str | None, bool]:
        rng, port = self.rng, self.port
        ours = [f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1", f"LOCALHOST.:{port}"]
        foreign = [f"evil.example:{port}", "attacker.test", f"127.0.0.1.nip.io:{port}", f"127.0.0.1:{port + 1}",
                   "", "[::1]x", "a" * 300, f"10.0.0.5:{port}"]
        kind = rng.random()
        if kind < 0.8:
            return rng.choice(ours), False
        if kind < 0.95:
            return rng.choice(foreign), True
        return None, True  # no Host at all

    def _origin(self) -> tuple[str | None, bool]:
        kind = self.rng.random()
        if kind < 0.7:
            return None, False
        if kind < 0.85:
            return f"http://127.0.0.1:{self.port}", False
        return self.rng.choice(["http://evil.example", "null", f"https://127.0.0.1:{self.port}",
                                f"http://127.0.0.1:{self.port}/x", "x" * 200]), True

    def _auth(self) -> tuple[bool, str | None]:
        rng, token = self.rng, self.target.token
        kind = rng.random()
        if kind < 0.45:
            return True, rng.choice([f"Bearer {token}", f"bearer {token}", f"Bearer  {token} "])
        if kind < 0.75:
            return False, None
        wrong = [f"Bearer {new_token()}", f"Bearer {token[:-1]}", f"Bearer {token.upper()}", f"Bearer {token}x",
                 f"Basic {token}", token, "Bearer", "Bearer \u00e9\u00e9", "Bearer " + "a" * 5000]
        return False, rng.choice(wrong)

    def _body(self, path: str) -> bytes:
        rng = self.rng
        kind = rng.random()
        if kind < 0.6:
            return json.dumps(self._change(path, hostile=True), allow_nan=True).encode()
        if kind < 0.7:
            return rng.randbytes(rng.randrange(0, 2000))
        if kind < 0.8:
            depth = rng.randrange(100, 20000)
            return (b"[" * depth + b"]" * depth)[: LIMITS.body_bytes - 1]
        if kind < 0.9:
            return b'{"operator": "' + b"a" * (LIMITS.body_bytes + rng.randrange(1, 10 ** 5)) + b'"}'
        return rng.choice([b"", b"null", b"[]", b'"x"', b"1e999", b"{", b'{"operator": "ann"'])

    def _change(self, path: str, hostile: bool) -> dict:
        """A change's body for ``path``: plausible values, or (``hostile``) any of them made wrong."""
        rng = self.rng
        pick = (lambda good, bad: rng.choice(bad) if hostile and rng.random() < 0.7 else rng.choice(good))
        body = {"operator": pick(["ann", "bo", "o" * 64], [{"name": "ann"}, ["ann"], 7, None, "", " ", "x" * 65,
                                                          "a\nb", "\u202eevil", "ann\x00", True])}
        if "threshold" in path:
            if rng.random() < 0.3:
                body.update(recalibrate=pick([True], [1, "yes", {}, []]),
                            quantile=pick([0.9, 0.99], [2, -0.1, "q", None, float("nan")]))
            else:
                body["value"] = pick([0.3, 0.5, 0.7], [-1, 1e308, float("nan"), float("inf"), "0.5", None, [0.5],
                                                       {"v": 1}, True, 10 ** 30])
        elif "recipe" in path:
            body["recipe"] = pick(["default"], ["nope", {"a": 1}, ["default"], None, 5, "x" * 10000])
        elif path.endswith("/enroll"):
            body["label"] = pick(["normal", "defect"], ["fine", None, ["normal"], {"l": 1}])
            if rng.random() < 0.3:
                body.update(label="defect", region=pick([[0.1, 0.1, 0.5, 0.5]], [
                    [0, 0, 1, 1], [0.5, 0.5, 0.1, 0.1], [], "0123", {"x": 1}, [float("nan")] * 4, [1e308] * 4,
                    list(range(3000))]))
        if hostile and rng.random() < 0.1:
            body["extra"] = {"nested": [[[["deep"]]]], "n": 10 ** 40}
        return body

    def _length(self, body: bytes) -> list[tuple[str, str]]:
        kind = self.rng.random()
        if kind < 0.8:
            return [("Content-Length", str(len(body)))] if body else []
        return [("Content-Length", self.rng.choice([str(len(body) + 100), str(max(0, len(body) - 3)), "-1", "abc",
                                                    "99999999999999999999", f"{len(body)}, {len(body)}"]))]

    def _junk_headers(self) -> list[tuple[str, str]]:
        rng = self.rng
        if rng.random() < 0.8:
            return [("Connection", "close")] if rng.random() < 0.5 else []
        count = rng.choice([1, 5, 40, 100])
        size = rng.choice([5, 100, 5000])
        return [(f"X-F{i}", "v" * size) for i in range(count)]

    def _chunked(self, body: bytes) -> bytes:
        if self.rng.random() < 0.5:
            return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        return self.rng.choice([b"zz\r\nabc\r\n", b"ffffffffffff\r\n", b"5\r\nab", body])


# -- sending ---------------------------------------------------------------------------------------


def send(port: int, case: Case, wait_s: float) -> Answer:
    """Send one case on a connection of its own; its answer (or none) within ``wait_s``."""
    tic = time.monotonic()
    try:
        sock = connect(case.client, port, wait_s)
    except OSError:
        return Answer(seconds=time.monotonic() - tic)
    with sock:
        data = case.raw()
        try:
            if case.mode == "dribble":
                for start in range(0, len(data), max(1, len(data) // 8)):
                    sock.sendall(data[start:start + max(1, len(data) // 8)])
                    time.sleep(0.01)
            elif case.mode == "cut":
                sock.sendall(data[:random.Random(len(data)).randrange(0, max(1, len(data)))])
                sock.shutdown(socket.SHUT_WR)
            else:
                sock.sendall(data)
        except OSError:
            pass  # the page may answer (and close) before a request too large is all sent
        answer = read_answer(sock, case.method, wait_s)
    answer.seconds = time.monotonic() - tic
    return answer


def connect(client: str, port: int, wait_s: float) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(wait_s)
    try:
        sock.bind((client, 0))
    except OSError:
        pass  # that loopback address is not there: the connection comes from 127.0.0.1
    sock.connect(("127.0.0.1", port))
    return sock


def read_answer(sock: socket.socket, method: str, wait_s: float) -> Answer:
    data, deadline = b"", time.monotonic() + wait_s
    try:
        while b"\r\n\r\n" not in data:
            chunk = recv(sock, deadline)
            if not chunk:
                return Answer(status=_status(data), body=data)
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status, length, stream = _status(head), _length_of(head), b"text/event-stream" in head.lower()
        if method == "HEAD" or status in (204, 304):
            return Answer(status=status, body=head)
        while (length is None or len(body) < length) and not (stream and b"\n\n" in body):
            chunk = recv(sock, deadline)
            if not chunk:
                break
            body += chunk
        return Answer(status=status, body=head + b"\r\n\r\n" + body)
    except socket.timeout:
        return Answer(status=_status(data), body=data, timed_out=True)
    except OSError:
        return Answer(status=_status(data), body=data)


def recv(sock: socket.socket, deadline: float) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout
    sock.settimeout(left)
    return sock.recv(65536)


def _status(head: bytes) -> int | None:
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else None


def _length_of(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value.strip())
    return None


# -- checking --------------------------------------------------------------------------------------


def check(report: Report, target: Target, case: Case, answer: Answer, before: tuple, limits: Limits) -> None:
    report.statuses[answer.status] += 1
    body = answer.body
    if any(mark in body for mark in TRACEBACK_MARKS):
        report.fail("traceback", case, body[:300].decode("latin-1"))
    leaked = [secret.decode() for secret in target.secrets if secret in body]
    if leaked:
        report.fail("leak", case, f"{leaked}: {body[:300].decode('latin-1')}")
    if answer.status == 500:
        report.fail("server error", case, body[:300].decode("latin-1"))
    ok = answer.status is not None and 200 <= answer.status < 300
    if ok and case.foreign:
        report.fail("foreign host answered", case, f"{answer.status}")
    after = target.state()
    if not case.authorized and (after != before or (ok and case.method == "POST")):
        report.fail("change without the token", case, f"{before} -> {after}, {answer.status}")
    report.applied += case.authorized and ok
    if answer.timed_out and case.mode != "cut":
        report.fail("hang", case, f"no whole answer in {answer.seconds:.1f} s")
    held = target.page.server.gate.connections.held
    if held > limits.connections:
        report.fail("over the limit", case, f"{held} connections held, the limit is {limits.connections}")


def probe(report: Report, target: Target, wait_s: float) -> None:
    case = Case("127.0.0.1", "GET", "/api/state", [("Host", f"127.0.0.1:{target.port}"), ("Connection", "close")],
                b"", "whole", False, False)
    answer = send(target.port, case, wait_s)
    if answer.status != 200:
        report.fail("down", None, f"GET /api/state: {answer.status}, {answer.body[:200]!r}")


def flood(report: Report, target: Target, limits: Limits, wait_s: float) -> None:
    """More connections at once than the page serves, from as many addresses as it allows each: the excess is
    refused at once (503), the page still answers once they go."""
    count = limits.connections + FLOOD_EXTRA
    per = limits.connections_per_client
    clients = [f"127.0.{2 + i // (per * 200)}.{2 + (i // per) % 200}" for i in range(count)]
    gate = target.page.server.gate
    socks, seen = [], gate.seen
    try:
        for client in clients:
            socks.append(connect(client, target.port, wait_s))
        deadline = time.monotonic() + wait_s
        while gate.seen < seen + count and time.monotonic() < deadline:
            time.sleep(0.01)  # the page's thread accepts them: nothing to wait on from here
        held = gate.connections.held
        refused = refusals(socks, count - held, deadline)
    finally:
        for sock in socks:
            sock.close()
    report.floods.append({"connections": count, "held": held, "refused": refused})
    if held > limits.connections or refused < count - limits.connections:
        report.fail("over the limit", None, f"flood of {count}: {held} held, {refused} refused")
    probe(report, target, wait_s)


def refusals(socks: list[socket.socket], expected: int, deadline: float) -> int:
    """How many of ``socks`` were answered 503 (the page's refusal, written before it reads), waiting for
    ``expected`` of them at most until ``deadline``."""
    refused = 0
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while refused < expected and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                selector.unregister(key.fileobj)
                try:
                    refused += key.fileobj.recv(64).startswith(b"HTTP/1.1 503")
                except OSError:
                    pass
    return refused


class SlowClients:
    """Clients that each hold a connection by sending a byte at a time; how long the page lets each stay."""

    def __init__(self, count: int, target: Target, limits: Limits, report: Report):
        self.target, self.limits, self.report = target, limits, report
        self.stop = threading.Event()
        self.bound_s = limits.header_s + limits.body_s + HANG_SLACK_S
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]
        self._lock = threading.Lock()

    def __enter__(self) -> "SlowClients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(self.bound_s + 5)

    def _run(self, index: int) -> None:
        port, token = self.target.port, self.target.token
        heads = [f"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: " + "a" * 200,
                 f"POST /api/threshold HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Length: 2000\r\n\r\n" + "{" * 2000]
        while not self.stop.is_set():
            text = heads[index % 2]
            self._hold(f"127.0.1.{2 + index}", text.encode(), 3000 if index % 2 else 0)

    def _hold(self, client: str, data: bytes, body_at: int) -> None:
        tic = time.monotonic()
        try:
            sock = connect(client, self.target.port, self.bound_s)
        except OSError:
            return
        with sock:
            position = data.index(b"\r\n\r\n") + 4 if body_at else 0
            try:
                sock.sendall(data[:position])
                for i in range(position, len(data)):
                    if self.stop.is_set() or time.monotonic() - tic > self.bound_s:
                        break
                    sock.sendall(data[i:i + 1])
                    time.sleep(SLOW_GAP_S)
            except OSError:
                pass  # the page cut it: what is wanted
        seconds = time.monotonic() - tic
        with self._lock:
            self.report.slow["connections"] += 1
            self.report.slow["longest_s"] = round(max(self.report.slow["longest_s"], seconds), 2)
            if seconds > self.bound_s and not self.stop.is_set():
                self.report.fail("held too long", None, f"a slow client stayed {seconds:.1f} s")


def run(bundle: Path, cases: int, seed: int = 0, slow: int = 4, limits: Limits = LIMITS) -> Report:
    """Fuzz a page over a copy of ``bundle`` with ``cases`` requests and ``slow`` slow clients; the report."""
    report = Report()
    rng = random.Random(seed)
    wait_s = limits.header_s + limits.body_s + HANG_SLACK_S
    clients = [f"127.0.0.{2 + i}" for i in range(CLIENTS)]
    with tempfile.TemporaryDirectory(prefix="mrad-fuzz-web-") as folder:
        target = Target(Path(bundle), Path(folder) / "site", limits)
        tic = time.monotonic()
        try:
            flood(report, target, limits, wait_s)
            with SlowClients(slow, target, limits, report):
                maker = Maker(rng, target, clients)
                for number in range(cases):
                    case = maker.case()
                    before = target.state()
                    answer = send(target.port, case, CHANGE_S if case.authorized else wait_s)
                    check(report, target, case, answer, before, limits)
                    report.cases += 1
                    if number % PROBE_EVERY == PROBE_EVERY - 1:
                        probe(report, target, wait_s)
            flood(report, target, limits, wait_s)
        finally:
            report.seconds = time.monotonic() - tic
            target.close()
        check_audit(report, Path(folder) / "site" / "operator" / "audit.jsonl")
    return report


def check_audit(report: Report, path: Path) -> None:
    if not path.exists():
        report.audit = {"entries": 0, "intact": True}
        return
    verdict = verify(path)
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    asked = sum("result" not in e for e in entries)
    results = collections.Counter(e["result"] for e in entries if "result" in e)
    report.audit = {"entries": len(entries), "intact": verdict.intact, "asked": asked, **results}
    if not verdict.intact:
        report.fail("audit", None, "; ".join(verdict.problems[:5]))
    if asked != sum(results.values()) or results["applied"] != report.applied:
        report.fail("audit", None, f"{asked} asked, results {dict(results)}, {report.applied} answered as applied")


@click.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--cases", default=2000, show_default=True, type=click.IntRange(min=1))
@click.option("--slow", default=8, show_default=True, type=click.IntRange(min=0), help="Slow clients at once.")
@click.option("--seed", default=0, show_default=True)
@click.option("--failures", type=click.Path(path_type=Path, dir_okay=False),
              help="A JSON file for the failing cases (their requests as sent), for reproduction.")
def main(bundle: Path, cases: int, slow: int, seed: int, failures: Path | None) -> None:
    """Send hostile HTTP to the operator's page; print what came back and what failed (exit 1 if anything did)."""
    report = run(bundle, cases, seed, slow)
    click.echo(json.dumps(report.summary(), indent=1))
    if failures is not None and report.examples:
        failures.write_text(json.dumps(report.examples, indent=1))
    raise SystemExit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
