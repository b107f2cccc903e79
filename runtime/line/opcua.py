"""OPC UA: a server (asyncua, in its own thread and event loop) serving the station's latest verdict to PLCs.

Under Objects, one object named after the station, in the namespace
``urn:mrad-edge``; its variables have string node ids ``<station>.<Name>``
(``ns=<index of urn:mrad-edge>;s=line.Score``), to read or subscribe to;
none is writable:

============  ========  =====================================================
Score         Double    the latest scored frame's score
Decision      String    "anomalous", "normal", or "" when no threshold is known
Frame         Int64     the latest frame's index (scored, error or dropped)
Timestamp     DateTime  when that frame was read
Source        String    where it came from
Frames        UInt64    frames so far (scored, errors and dropped)
Anomalous     UInt64    frames decided anomalous so far
Errors        UInt64    frames that could not be scored so far
Healthy       Boolean   frames are coming in: false while the camera is lost, and once the run has stopped
Status        String    "running", "camera lost" or "stopped"
============  ========  =====================================================

``write`` only notes the new values; the server's loop publishes the latest
ones, Frame last (a client that sees a new Frame reads that frame's values),
so a stalled client never holds up scoring. The server runs
without security (NoSecurity): serve it on loopback or the line's own network.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import datetime, timezone

from ..errors import MradError
from .settings import need
from .sinks import Sink

need("asyncua")
from asyncua import Server, ua  # noqa: E402 - after need() has said how to install it

NAMESPACE = "urn:mrad-edge"
START_TIMEOUT_S = 30.0  # the standard address space takes about a second to build
STOP_TIMEOUT_S = 5.0
VARIABLES = {  # name: (value before the first frame, OPC UA type)
    "Score": (0.0, ua.VariantType.Double),
    "Decision": ("", ua.VariantType.String),
    "Frame": (-1, ua.VariantType.Int64),
    "Timestamp": (datetime(1601, 1, 1, tzinfo=timezone.utc), ua.VariantType.DateTime),  # OPC UA's "no time"
    "Source": ("", ua.VariantType.String),
    "Frames": (0, ua.VariantType.UInt64),
    "Anomalous": (0, ua.VariantType.UInt64),
    "Errors": (0, ua.VariantType.UInt64),
    "Healthy": (True, ua.VariantType.Boolean),
    "Status": ("running", ua.VariantType.String),
}


def _when(timestamp) -> datetime:
    try:
        return datetime.fromisoformat(timestamp)
    except (TypeError, ValueError):  # a source that stamps frames otherwise: the time it arrived here
        return datetime.now(timezone.utc)


class OpcUaSink(Sink):
    """Serves the station's latest verdict at ``endpoint`` (see the module's docstring); ``close`` stops the server."""

    needs_picture = False

    def __init__(self, endpoint: str, station: str = "line"):
        logger = logging.getLogger("asyncua")
        if logger.level == logging.NOTSET:  # it warns that NoSecurity is unencrypted (--help says so) and logs
            logger.setLevel(logging.CRITICAL)  # a failed start with a traceback (raised here as MradError instead)
        self.name, self.station = endpoint, station
        self.updates = self.failed = 0
        self._values = {name: value for name, (value, _) in VARIABLES.items()}
        self._due: set[str] = set()  # names whose new value the server has not published yet
        self._scheduled = self._closed = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mrad-opcua", daemon=True)
        self._thread.start()
        try:
            self._server, self._nodes = self._call(self._start(), START_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a port in use, a bad host: said once, with the endpoint
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise MradError(f"the OPC UA server cannot start at {endpoint}: {exc or type(exc).__name__}") from exc

    def _call(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _start(self):
        server = Server()
        await server.init()
        server.set_endpoint(self.name)
        server.set_server_name("mrad-run")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        index = await server.register_namespace(NAMESPACE)
        station = await server.nodes.objects.add_object(ua.NodeId(self.station, index),
                                                        ua.QualifiedName(self.station, index))
        nodes = {}
        for name, (value, kind) in VARIABLES.items():
            node = await station.add_variable(ua.NodeId(f"{self.station}.{name}", index), ua.QualifiedName(name, index),
                                              ua.Variant(value, kind))
            nodes[name] = node.nodeid
        await server.start()
        return server, nodes

    def write(self, record: dict, picture=None, frame=None, anomaly_map=None) -> None:
        with self._lock:
            if self._closed or not self._note(record) or self._scheduled:
                return
            self._scheduled = True
        asyncio.run_coroutine_threadsafe(self._publish(), self._loop)

    def _note(self, record: dict) -> bool:
        """Take the record's values; True if any changed."""
        event, new = record.get("event"), {}
        if event == "camera_lost":
            new = {"Healthy": False, "Status": "camera lost"}
        elif event == "camera_reopened":
            new = {"Healthy": True, "Status": "running"}
        elif event is None:
            new = {"Frame": record["frame"], "Source": record["source"], "Timestamp": _when(record["timestamp"]),
                   "Frames": self._values["Frames"] + 1}
            if "score" in record:
                new.update(Score=record["score"], Decision=record.get("decision", ""))
                if record.get("decision") == "anomalous":
                    new["Anomalous"] = self._values["Anomalous"] + 1
            elif "error" in record:
                new["Errors"] = self._values["Errors"] + 1
        self._values.update(new)
        self._due.update(new)
        return bool(new)

    async def _publish(self) -> None:
        with self._lock:  # Frame last: a client that sees a new Frame reads that frame's values with it
            values = {name: self._values[name] for name in sorted(self._due, key=lambda name: name == "Frame")}
            self._due.clear()
            self._scheduled = False
        for name, value in values.items():
            try:
                await self._server.write_attribute_value(self._nodes[name],
                                                         ua.DataValue(ua.Variant(value, VARIABLES[name][1])))
            except Exception:  # noqa: BLE001 - counted in the summary; the next frame writes it again
                self.failed += 1
        self.updates += 1

    def close(self, timeout: float) -> dict:
        """Say "stopped" (Healthy false), stop the server and its thread; the counts for the summary."""
        with self._lock:
            self._closed = True
            self._values.update(Healthy=False, Status="stopped")
            self._due.update(("Healthy", "Status"))

        async def stop():
            await self._publish()
            await self._server.stop()

        try:
            self._call(stop(), STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the run is over: a server that will not stop is left to the process's end
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT_S)
        return {"updates": self.updates, "failed": self.failed}
