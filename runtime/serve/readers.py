"""mrad-serve --camera: one reader actor per stream, anywhere on the cluster, its records written by mrad-serve.

A reader (a Ray actor) reads its stream where Ray placed it (spread over the
nodes, or on nodes with a custom resource such as ``camera``: those that can
reach the cameras), sends each frame to the application's replicas and
answers mrad-serve with that frame's record, one frame per call. mrad-serve
(the driver) alone writes: the records of camera n to ``--out/camera-<n>.jsonl``
on its own machine, and every record to the line sinks (MQTT, OPC UA,
webhooks) it opened once. So ``--out`` is a folder of the machine running
mrad-serve wherever a camera is read, one OPC UA server and one client per
broker or webhook serve every camera (a server per reader would collide on
its port), and a reader holds nothing its death could lose but the frame it
is scoring.

A reader whose process dies, or whose node is lost, is restarted by Ray
(``READER_RESTARTS`` times at most), and Ray sends the restarted reader the
call it was answering. Each call names the frame that comes next, so the
stream goes on from there: a recording from that very frame (the frame in
flight is read and scored again; its record is written once), a live camera
from its next frame (the frame in flight was never recorded; frames that came
while no reader ran were never read). A "reader_restarted" event in the
camera's records marks the restart, with the node and process now reading.
Camera events (lost, reopened) travel with the next answer: one written
while a camera is away reaches the outputs when it is back, or given up.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import ray
from ray import serve

from ..line.engine import RunStats, close_sinks, hand_out
from ..errors import MradError, SourceError
from ..files import OutputBusy, open_exclusive
from ..line.records import event_record, frame_record
from ..line.sinks import JsonLines
from ..line.sources import Camera
from . import APP_NAME, READER_PLACEMENTS, READER_RESTARTS

# Of a node's custom resource (--reader-resource): so small a share that a node started with
# --resources '{"camera": 1}' takes any number of readers.
RESOURCE_SHARE = 0.001
# Replicas a frame may be sent to, when the one scoring it is lost, before it gets an error record.
SCORE_TRIES = 3
# At a stop, how long the frames in flight may take to be scored and written.
STOP_WAIT_S = 10.0


@ray.remote(num_cpus=0, max_restarts=READER_RESTARTS, max_task_retries=-1)  # I/O: the CPUs are the replicas'
class CameraReader:
    """One stream: ``next(start)`` reads a frame, has the application score it, and answers its record.

    One frame in flight per camera keeps records in frame order; frames of several cameras meet in
    the replicas' batches.
    """

    def __init__(self, spec: str, reconnect_timeout: float, app_name: str = APP_NAME):
        self.spec, self.reconnect_timeout, self.app_name = spec, reconnect_timeout, app_name
        self.frames = None  # opened by the first call (again after a restart), which says where to start
        self.events: list[dict] = []
        self.handle = None

    def next(self, start: int) -> dict:
        """``records``: the camera's events since the last answer, then frame ``start``'s record; or ``end``:
        "stream_end" (a video file's last frame was read) or why the camera failed for good."""
        if self.frames is None:
            context = ray.get_runtime_context()
            self.events.append(event_record(
                "reader_restarted" if context.was_current_actor_reconstructed else "reader_started",
                source=self.spec, frame=start, node=context.get_node_id(), pid=os.getpid()))
            self.frames = Camera(self.spec, self.reconnect_timeout, events=self.events.append).frames(start)
            self.handle = serve.get_app_handle(self.app_name)
        try:
            frame = next(self.frames, None)
        except SourceError as exc:
            return self._answer(end=str(exc))
        if frame is None:
            return self._answer(end="stream_end")
        return self._answer(record=self._scored(frame))

    def _scored(self, frame) -> dict:
        """The frame's record; a replica lost while scoring it (Serve replaces it) is tried again, on another."""
        for _ in range(SCORE_TRIES):
            try:
                return self.handle.score_frame.remote(frame).result()
            except ray.exceptions.RayActorError as exc:
                lost = exc
        return frame_record(replace(frame, error=f"not scored: {SCORE_TRIES} replicas were lost scoring it ({lost})"))

    def _answer(self, record: dict | None = None, end: str | None = None) -> dict:
        records, self.events = self.events, []
        return {"records": records + ([record] if record else []), "end": end}


def reader_options(placement: str = "spread", resource: str | None = None) -> dict:
    """CameraReader.options: ``placement`` "spread" over the nodes (those with ``resource`` when given) or on the
    "driver"'s node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if placement not in READER_PLACEMENTS:
        raise MradError(f"--reader-placement must be one of {', '.join(READER_PLACEMENTS)}, not {placement!r}")
    if placement == "driver" and resource:
        raise MradError("--reader-resource picks the readers' nodes, --reader-placement driver pins them to this one: "
                        "give one of them")
    if resource and resource not in ray.cluster_resources():
        raise MradError(f"--reader-resource {resource}: no node of the cluster has it; start the nodes that reach the "
                        f"cameras with ray start ... --resources '{{\"{resource}\": 1}}'")
    if placement == "driver":
        here = ray.get_runtime_context().get_node_id()
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}
    return {"scheduling_strategy": "SPREAD", **({"resources": {resource: RESOURCE_SHARE}} if resource else {})}


class Readers:
    """The driver's side: a reader per camera, one call in flight each; their records to the camera's JSON lines
    and to the line sinks, counted in ``stats``.

    Call ``poll`` until it returns False (every stream has ended), or ``stop``; then ``close``.
    """

    def __init__(self, cameras: tuple[str, ...], out: Path, reconnect_timeout: float, app_name: str = APP_NAME,
                 placement: str = "spread", resource: str | None = None):
        self.cameras, self.reconnect_timeout, self.app_name = cameras, reconnect_timeout, app_name
        self.stats = RunStats()
        self.sinks: list = []  # the line sinks, shared by every camera: add them before ``start``
        self.lost: list[str] = []  # why cameras failed for good
        self._lock = threading.Lock()  # a line sink's thread reports its link's events
        self._options = reader_options(placement, resource)
        out.mkdir(parents=True, exist_ok=True)
        self._files = []
        try:
            for n in range(len(cameras)):
                self._files.append(open_exclusive(out / f"camera-{n}.jsonl"))
        except (OutputBusy, OSError) as exc:
            self._close_files()
            raise MradError(f"--out {out}: {exc}") from exc
        self._lines = [JsonLines(f) for f in self._files]
        self._frames = [0] * len(cameras)  # the next frame of each camera: records written so far
        self._calls: dict = {}  # call in flight -> camera
        self._reading: set[int] = set()  # cameras whose stream has not ended
        self._readers: list = []

    def start(self) -> None:
        self.stats.started = time.perf_counter()
        self._readers = [CameraReader.options(**self._options).remote(spec, self.reconnect_timeout, self.app_name)
                         for spec in self.cameras]
        self._calls = {reader.next.remote(0): n for n, reader in enumerate(self._readers)}
        self._reading = set(self._calls.values())

    def event(self, record: dict) -> None:
        """A line sink's event (its link lost, back): to every camera's records and the line sinks."""
        with self._lock:
            hand_out(self._lines + self.sinks, self.stats, record)

    def poll(self, timeout: float) -> bool:
        """Write the answers that came within ``timeout`` s, ask those readers for their next frame; False once every
        stream has ended."""
        if not self._calls:
            return False
        if ray.wait(list(self._calls), num_returns=1, timeout=timeout)[0]:
            for call in ray.wait(list(self._calls), num_returns=len(self._calls), timeout=0)[0]:
                self._answered(call, ask_again=True)
        return bool(self._calls)

    def stop(self, reason: str) -> None:
        """Write what the frames in flight give within STOP_WAIT_S, end each stream still read with ``reason``."""
        ready = ray.wait(list(self._calls), num_returns=len(self._calls), timeout=STOP_WAIT_S)[0] if self._calls else []
        for call in ready:
            self._answered(call, ask_again=False)
        for n in sorted(self._reading):
            self._write(n, event_record("stream_end", source=self.cameras[n], frames=self._frames[n],
                                        stopped_by=reason))
        self._calls, self._reading = {}, set()

    def close(self, timeout: float) -> dict[str, dict]:
        """End the readers, deliver what the line sinks hold within ``timeout`` s, close the files; the sinks' counts."""
        for reader in self._readers:
            ray.kill(reader, no_restart=True)
        self.stats.ended = time.perf_counter()  # reading is over: closing the sinks is not counted in fps
        counts = close_sinks(self.sinks, self.stats, timeout)
        self._close_files()
        return counts

    # -- answers ----------------------------------------------------------------------------------

    def _answered(self, call, ask_again: bool) -> None:
        n = self._calls.pop(call)
        try:
            answer = ray.get(call)
        except ray.exceptions.RayTaskError as exc:  # the reader raised (first: it may also be a RayActorError)
            answer = {"records": [], "end": str(exc.cause) if isinstance(exc.cause, MradError) else str(exc)}
        except ray.exceptions.RayActorError as exc:
            answer = {"records": [], "end": f"the reader of camera {self.cameras[n]!r} died and was restarted "
                                            f"{READER_RESTARTS} times: {exc}"}
        for record in answer["records"]:
            self._write(n, record)
        end = answer["end"]
        if end is None:
            if ask_again:
                self._calls[self._readers[n].next.remote(self._frames[n])] = n
            return
        self._reading.discard(n)
        if end != "stream_end":
            self.lost.append(end)
        self._write(n, event_record("stream_end", source=self.cameras[n], frames=self._frames[n],
                                    **({} if end == "stream_end" else {"error": end})))

    def _write(self, n: int, record: dict) -> None:
        if "event" not in record:
            self.stats.add(record)
            self._frames[n] = record["frame"] + 1
        with self._lock:
            hand_out([self._lines[n], *self.sinks], self.stats, record)

    def _close_files(self) -> None:
        for f in self._files:
            f.close()
