"""What mrad-serve reads from a request and writes back, kept apart from Ray so it can be tested alone."""

from __future__ import annotations

import email
import email.policy
import io

import numpy as np
from PIL import Image

from ..errors import ImageError
from ..core.overlay import overlay
from ..line.records import frame_record, now
from ..core.result import Result
from ..line.sources import Frame

IMAGE_FIELD = "image"  # the multipart/form-data field that carries the image


def image_bytes(body: bytes, content_type: str | None) -> bytes:
    """The image a POST carries: the whole body, or the ``image`` field of a multipart/form-data body."""
    if not (content_type or "").lower().startswith("multipart/form-data"):
        return body
    # The email parser reads MIME multipart bodies; it spares the server a form-parsing dependency.
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body,
                                       policy=email.policy.HTTP)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == IMAGE_FIELD:
            return part.get_payload(decode=True) or b""
    raise ImageError(f"the multipart form has no {IMAGE_FIELD!r} field: send the image as that field, or as the "
                     "raw request body")


def record(result: Result, index: int, latency_ms: float, source: str = "http") -> dict:
    """mrad-run's frame record for one request, with the map's statistics (the map itself: ``?map=png``)."""
    summary = result.to_dict()
    found = frame_record(Frame(source, index, now()), result, round(latency_ms, 3))
    found.update(map_size=summary["map_size"], map_max=round(summary["map_max"], 6),
                 map_mean=round(float(result.anomaly_map.mean()), 6))
    return found


def overlay_png(image: bytes, result: Result) -> bytes:
    """The heatmap overlay mrad-run --save-maps writes, as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(overlay(image, result.anomaly_map)).save(out, format="PNG")
    return out.getvalue()


def decoded_png(data: bytes) -> np.ndarray:
    """A PNG answer back to RGB pixels (for clients and tests)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
