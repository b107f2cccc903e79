"""Who may reach the operator's page, and how much of it may be taken: every bound the page keeps.

The page shares its process with inspection. Whatever a client does (open a
thousand connections, never finish its headers, guess tokens, name the page
by another host) must cost the line nothing and cannot take the page's
descriptors beyond a fixed number. Hence:

- :class:`Gate`: the page's connections, counted per client address and in
  all, are refused at once beyond :attr:`Limits.connections` (a 503 written
  and the socket closed, before a byte is read), and so is one that would use
  a descriptor of the :attr:`Limits.fd_reserve` kept for the line;
- :class:`Tally` again for the event streams (:attr:`Limits.streams`);
- :class:`Hosts`: the ``Host`` (and ``Origin``) a request names must be an
  address the page serves (loopback names on loopback, the address the
  connection reached, or a name given with ``--web-host``): a page elsewhere
  that rebinds its own name to this machine is refused;
- :class:`Guesses`: wrong tokens, counted per client address in a bounded
  table; past a burst, one try per :attr:`Limits.guess_every_s` (and the
  token itself is strong: :mod:`.tokens`).

The time a request's headers and body may take, and their sizes, are
:class:`Limits` too; :mod:`.server` hands them to aiohttp.
"""

from __future__ import annotations

import collections
import ipaddress
import resource
import time
from dataclasses import dataclass
from typing import Callable

from aiohttp.web_protocol import RequestHandler

MAX_CONNECTIONS = 64  # connections to the page at once (each holds a descriptor); more are refused at once
MAX_CONNECTIONS_PER_CLIENT = 16  # from one address: a browser opens 6, and its event stream
MAX_STREAMS = 16  # event streams at once: each is sent what changed every PUSH_S
MAX_STREAMS_PER_CLIENT = 4  # a few tabs of one browser
FD_RESERVE = 256  # descriptors kept for the line (cameras, files, sinks): the page never takes one of these
HEADER_S = 10.0  # a request's headers arrive within this (an idle connection is closed after it, too)
BODY_S = 10.0  # a request's body arrives within this
MAX_BODY_BYTES = 16 * 1024  # a change is a small JSON object
MAX_LINE_BYTES = 4096  # the request line, and each header line
MAX_HEADERS = 48
GUESS_BURST = 10  # wrong tokens one client may send in a row ...
GUESS_EVERY_S = 2.0  # ... then one per this many seconds
GUESSERS = 1024  # client addresses whose wrong tokens are counted; beyond, new ones share one count
IPV6_NETWORK = 64  # an IPv6 client is counted by its /64: one host holds a whole /64
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ECHOED = 64  # characters of a refused Host or Origin said back


@dataclass(frozen=True)
class Limits:
    """The page's bounds (defaults: the constants above); tests and the fuzz harness make them shorter."""

    connections: int = MAX_CONNECTIONS
    connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT
    streams: int = MAX_STREAMS
    streams_per_client: int = MAX_STREAMS_PER_CLIENT
    fd_reserve: int = FD_RESERVE
    header_s: float = HEADER_S
    body_s: float = BODY_S
    body_bytes: int = MAX_BODY_BYTES
    line_bytes: int = MAX_LINE_BYTES
    headers: int = MAX_HEADERS
    guess_burst: int = GUESS_BURST
    guess_every_s: float = GUESS_EVERY_S
    guessers: int = GUESSERS


# -- token guesses ---------------------------------------------------------------------------------


class Guesses:
    """Wrong tokens per client (a token bucket each): past the burst, one try per ``every_s``; a bounded table."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.burst, self.every_s, self.size, self.clock = limits.guess_burst, limits.guess_every_s, limits.guessers, clock
        self._left: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()  # key -> (tries, at)

    def allowed(self, client: str) -> float:
        """0 when ``client`` may try a token now, else the seconds until it may."""
        tries = self._tries(self._key(client))
        return 0.0 if tries >= 1 else (1 - tries) * self.every_s

    def failed(self, client: str) -> None:
        key = self._key(client)
        self._left[key] = (self._tries(key) - 1, self.clock())
        self._left.move_to_end(key)

    def _tries(self, key: str) -> float:
        if key not in self._left:
            return float(self.burst)
        tries, at = self._left[key]
        return min(float(self.burst), tries + (self.clock() - at) / self.every_s)

    def _key(self, client: str) -> str:
        """The client's own count, while the table has room; else the count all newcomers share."""
        key = _network(client)
        if key in self._left or len(self._left) < self.size:
            return key
        for old in list(self._left):  # room is made by forgetting who has recovered fully
            if self._tries(old) >= self.burst:
                del self._left[old]
        return key if len(self._left) < self.size else "(everyone else)"


def _network(client: str) -> str:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    address = _unmapped(address)
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/{IPV6_NETWORK}", strict=False))
    return str(address)


# -- connections ----------------------------------------------------------------------------------


class Tally:
    """Things held at once, in all and per client; ``take`` says why not, or None when one is taken."""

    def __init__(self, total: int, per_client: int, what: str):
        self.total, self.per_client, self.what = total, per_client, what
        self.held = 0
        self.refused = 0
        self._by_client: collections.Counter[str] = collections.Counter()

    def take(self, client: str) -> str | None:
        if self.held >= self.total:
            return self._refuse(f"{self.total} {self.what} are open, the most the page serves")
        if self._by_client[client] >= self.per_client:
            return self._refuse(f"{self.per_client} {self.what} from one client are open, the most it may hold")
        self.held += 1
        self._by_client[client] += 1
        return None

    def give(self, client: str) -> None:
        self.held -= 1
        self._by_client[client] -= 1
        if self._by_client[client] <= 0:
            del self._by_client[client]

    def _refuse(self, why: str) -> str:
        self.refused += 1
        return why


class Gate:
    """The page's connections: counted from the moment they are accepted; one over a limit is refused at once."""

    def __init__(self, limits: Limits):
        self.connections = Tally(limits.connections, limits.connections_per_client, "connections")
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.fd_ceiling = (soft if soft != resource.RLIM_INFINITY else 1 << 20) - limits.fd_reserve
        self.seen = 0  # connections accepted so far
        self.refused = 0  # of which refused

    def admit(self, client: str, fd: int) -> str | None:
        """None when the connection may stay, else why not (said in the 503 written before it is closed)."""
        self.seen += 1
        if fd >= self.fd_ceiling:  # the lowest free descriptor is this high: the process is close to its limit
            self.refused += 1
            return "the process is short of file descriptors: they are kept for the line"
        why = self.connections.take(client)
        self.refused += why is not None
        return why

    def release(self, client: str) -> None:
        self.connections.give(client)


class GatedHandler(RequestHandler):
    """aiohttp's request handler, admitted by a :class:`Gate` when its connection is made."""

    __slots__ = ("_gate", "_client")

    def __init__(self, gate: Gate, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gate, self._client = gate, None

    def connection_made(self, transport) -> None:
        client = client_of(transport)
        sock = transport.get_extra_info("socket")
        why = self._gate.admit(client, sock.fileno() if sock is not None else 0)
        if why is not None:
            transport.write(refusal(503, why))
            transport.close()  # nothing of it is read: aiohttp never sees it
            return
        self._client = client
        super().connection_made(transport)

    def connection_lost(self, exc) -> None:
        if self._client is None:  # refused: it was never aiohttp's
            return
        self._gate.release(self._client)
        self._client = None
        super().connection_lost(exc)


def client_of(transport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, (tuple, list)) and peer else "?"


def refusal(status: int, why: str) -> bytes:
    """A whole HTTP answer, for a connection refused before aiohttp reads it."""
    body = ('{"error": "' + why.replace('"', "'") + '"}').encode()
    reason = {503: "Service Unavailable"}.get(status, "Refused")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: 5\r\nConnection: close\r\n\r\n").encode() + body


# -- host names -----------------------------------------------------------------------------------


class Hosts:
    """The names a request may give the page by (``Host``, ``Origin``): a page elsewhere that rebinds its name
    to this machine is refused.

    Allowed: the address the page is bound to (when it is one address), the address the connection reached
    (a client that typed an IP address), the loopback names when that address is loopback, and ``extra``
    (``--web-host``: the machine's names on the line's network, or a proxy's).
    """

    def __init__(self, bound: str, port: int, extra: tuple[str, ...] = ()):
        self.port = port
        self.names = {_name(bound)} if not _any_address(bound) else set()
        self.extra = {_name(name) for name in extra}

    def allows(self, host: str | None, local: str | None) -> bool:
        """Whether ``host`` (a Host header, ``name[:port]``) names this page, on a connection to ``local``."""
        if not host:
            return False
        name, port = _split(host)
        if name in self.extra:
            return True
        if port is not None and port != self.port:
            return False
        local = _name(local or "")
        return name in self.names or name == local or (_is_loopback(local) and name in LOOPBACK_NAMES)

    def allows_origin(self, origin: str, local: str | None) -> bool:
        """An ``Origin`` (``http://name:port``) is the page's own."""
        scheme, sep, rest = origin.partition("://")
        return bool(sep) and scheme.lower() == "http" and "/" not in rest and self.allows(rest, local)


def _split(host: str) -> tuple[str, int | None]:
    host = host.strip()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):  # "[::1", "[::1]x": no host name
            return "", None
        port = rest[1:] if rest else None
    else:
        name, sep, port = host.rpartition(":")
        if not sep or ":" in name:  # no port, or an IPv6 address without brackets
            name, port = host, None
    if port is not None and not (port.isdigit() and len(port) <= 5):
        return "", None
    return _name(name), int(port) if port is not None else None


def _name(host: str) -> str:
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    return str(_unmapped(address))


def _unmapped(address):
    """An IPv4 address seen through an IPv6 socket (::ffff:10.0.0.5) as itself."""
    return getattr(address, "ipv4_mapped", None) or address


def _any_address(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def echoed(text: str) -> str:
    """A refused header said back, bounded and printable."""
    text = "".join(c if c.isprintable() else "?" for c in text[:ECHOED])
    return repr(text)
