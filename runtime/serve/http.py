"""POST /predict, today's route: what it reads from a request and writes back (the protocol: :mod:`.protocol`)."""

from __future__ import annotations

import email
import email.policy
import io

import numpy as np
from PIL import Image

from ..core.overlay import overlay
from ..errors import ImageError
from ..line.records import frame_record, now
from ..line.sources import Frame
from .backend import Scored
from .protocol import MAX_FORM_PARTS, MAX_LABEL_CHARS, ProtocolError

IMAGE_FIELD = "image"  # the multipart/form-data field that carries the image
MAX_PART_HEADER_BYTES = 8192  # a form part's headers (aiohttp's own limit for a header line)
MAX_FRAME = 2**63 - 1  # ?frame=: what a record's consumers (databases, PLCs) hold as an integer


def image_bytes(body: bytes, content_type: str | None, max_parts: int = MAX_FORM_PARTS) -> bytes:
    """The image a POST carries: the whole body, or the ``image`` field of a multipart/form-data body.

    A form of more than ``max_parts`` parts is refused before any part is parsed: the body is split once,
    at most that many times.
    """
    if not (content_type or "").lower().startswith("multipart/form-data"):
        return body
    # The email parser reads the content type and each part's headers (small); the body is split here, so a
    # form of 60,000 parts costs one bounded split, not 60,000 parsed messages.
    boundary = _header(f"Content-Type: {content_type}").get_param("boundary")
    if not boundary or len(boundary) > 70:  # RFC 2046: 1 to 70 characters
        raise ImageError("the multipart form's Content-Type has no usable boundary parameter")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    chunks = (b"\r\n" + body).split(delimiter, max_parts + 1)
    if len(chunks) > max_parts + 1 and not chunks[-1].startswith(b"--"):
        raise ImageError(f"the multipart form has more than {max_parts} parts; send the image alone")
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep or len(head) > MAX_PART_HEADER_BYTES:
            raise ImageError("the multipart form has a part without headers")
        part = _header(head.split(b"\r\n", 1)[-1].decode("latin-1"))
        if part.get_param("name", header="content-disposition") == IMAGE_FIELD:
            return payload
    raise ImageError(f"the multipart form has no {IMAGE_FIELD!r} field: send the image as that field, or as the "
                     "raw request body")


def _header(text: str):
    return email.message_from_string(text + "\r\n\r\n", policy=email.policy.HTTP)


def frame_number(text: str | None) -> int | None:
    """?frame=N: a whole number a record can carry (a 64-bit signed integer), else 400."""
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_FRAME:
        raise ProtocolError(f"?frame= takes a whole number from 0 to {MAX_FRAME}, not {text[:32]!r}")
    return int(text)


def label(text: str | None, what: str, default: str) -> str:
    """?source=NAME: echoed in the record, so bounded."""
    if text is None:
        return default
    if len(text) > MAX_LABEL_CHARS:
        raise ProtocolError(f"{what} is {len(text)} characters long; at most {MAX_LABEL_CHARS}")
    return text


def record(found: Scored, index: int, source: str = "http") -> dict:
    """mrad-run's frame record for one request, with the map's statistics (the map itself: ``?map=png``)."""
    out = frame_record(Frame(source, index, now()), found.result, round(found.latency_ms, 3))
    out.update(map_size=list(found.map_size), map_max=round(found.map_max, 6), map_mean=round(found.map_mean, 6))
    return out


def overlay_png(image: bytes, anomaly_map: np.ndarray) -> bytes:
    """The heatmap overlay mrad-run --save-maps writes, as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(overlay(image, anomaly_map)).save(out, format="PNG")
    return out.getvalue()


def decoded_png(data: bytes) -> np.ndarray:
    """A PNG answer back to RGB pixels (for clients and tests)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
