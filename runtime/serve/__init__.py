"""mrad-serve: one bundle (or a station's recipe) for the line's software and cameras, over the Open Inference Protocol.

:mod:`.protocol` owns the protocol (requests into images, results into answers, its
errors) for REST and gRPC alike; :mod:`.front` answers both, and today's ``/predict``
(:mod:`.http`), with the token, TLS and the bounds, over a backend (:mod:`.backend`):
replicas of a Ray Serve application (:mod:`.app`; :mod:`.readers` for --camera streams)
or this process (:mod:`.local`, ``--local``). Only :mod:`.app` and :mod:`.readers` import
Ray, and :mod:`.cli` imports them only in the Ray mode, so neither the runtime nor
``--local`` needs Ray.
"""

from __future__ import annotations

import re

from ..errors import MradError

APP_NAME = "mrad"  # the default name: serve.get_app_handle(name) reaches a running mrad-serve from Python
READER_PLACEMENTS = ("spread", "driver")  # mrad-serve --reader-placement: over the cluster's nodes, or on mrad-serve's
READER_RESTARTS = 10  # a camera reader that keeps dying (a decoder crashing on every frame) is then given up
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # one URL path segment, no escaping needed


def route_prefix(name: str) -> str:
    """Where an application's routes start on the cluster's one HTTP port: / for the default, /NAME otherwise.

    Several applications (bundles) share the port of the cluster's Serve instance; each gets its own prefix.
    """
    if not _NAME.fullmatch(name):
        raise MradError(f"--name {name!r}: use letters, digits, '_', '.' and '-', starting with a letter or digit "
                        "(it becomes the URL prefix /NAME)")
    return "/" if name == APP_NAME else f"/{name}"
