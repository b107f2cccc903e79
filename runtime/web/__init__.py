"""The operator's page: watch the line, judge verdicts, teach the detector by click (``mrad-run --web``).

A page served while inspection runs: per source (named as the user gave it:
``--name``, else its path, URL or device id) the latest frame with its
heatmap, score and decision; a rolling plot of scores against the
threshold; counters and camera health, pushed live (Server-Sent Events); a
review queue of flagged frames (each card says its source, file and recipe;
the grid holds still while the pointer is on it) that the operator marks
"good" (enrolled as normal) or "defect" (optionally with a drawn region as
its mask); undo (the enrollment's rollback); the threshold recalibrated on
the enrolled good parts.
Every change needs the token and is written to an append-only, hash-chained
audit log before it is applied.

Three parts: :mod:`.view` (what the page shows: the sink side, which never
waits for a browser), :mod:`.teach` (the changes, one at a time, audited in
:mod:`.audit`) and :mod:`.server` (aiohttp in its own thread, bounded by
:mod:`.guard`, its answers made safe to show by :mod:`.redact`; the token:
:mod:`.tokens`). aiohttp is the ``web`` extra
(also in ``line``); it is imported only when ``--web`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..line.station import Station
from ..line.sinks import Sink
from .tokens import TOKEN_ENV, new_token, page_token  # noqa: F401 - the page's token, as mrad-run reads it

DATA_SUFFIX = ".operator"  # <bundle>.operator/: the audit log and the frames enrolled from the page


def default_data(bundle: Path) -> Path:
    bundle = Path(bundle).resolve()
    return bundle.with_name(bundle.name + DATA_SUFFIX)


class OperatorPage(Sink):
    """The page as one of the line engine's sinks: ``write`` feeds the view, ``close`` stops the server.

    ``station``: the running :class:`~mrad.runtime.line.station.Station`; the
    page's changes are calls on it. ``address``: (host, port). ``sources``: the
    run's sources, each name (its label on the page) -> what it reads, as the
    user gave it (see :class:`~mrad.runtime.web.view.SourceNames`). ``hosts``:
    names the page answers to beyond its address (``--web-host``); ``limits``:
    its bounds (:class:`~mrad.runtime.web.guard.Limits`, defaults when None).
    """

    needs_picture = False
    needs_frame = True
    name = "web page"

    def __init__(self, station: Station, address: tuple[str, int], token: str, data: Path,
                 sources: Mapping[str, Sequence[str]] | None = None, hosts: Sequence[str] = (), limits=None):
        from .guard import Limits
        from .server import PageServer  # aiohttp: the 'web' extra
        from .teach import Teacher
        from .view import LineView

        self.view = LineView(sources=sources)
        self.teacher = Teacher(station, self.view, data)
        self.server = PageServer(self.view, self.teacher, *address, token, hosts=tuple(hosts),
                                 limits=limits or Limits()).start()

    @property
    def url(self) -> str:
        return self.server.url

    def write(self, record: dict, picture=None, frame=None, anomaly_map=None) -> None:
        self.view.write(record, picture, frame=frame, anomaly_map=anomaly_map)

    def close(self, timeout: float) -> dict:
        self.server.close(max(timeout, 1.0))
        server = self.server
        return {"browsers": server.served, "updates_skipped": server.dropped,
                "refused": server.gate.refused + server.streams.refused}  # connections and streams over the limits
