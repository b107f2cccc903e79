"""What the page says to anyone who can reach it: no secret, no layout of the disks.

Reading the page needs no token, so every answer passes through
:func:`public`. Credentials in URLs (``rtsp://user:password@camera``,
``?token=...``) become ``***``; an absolute path is shortened to its last
:data:`PATH_PARTS` parts, ``…/good/001.png``: which file, not where the data,
the bundle or the calibration lives. The audit log on disk keeps everything.
"""

from __future__ import annotations

import re

PATH_PARTS = 2  # an absolute path is shown by its last parts: a file and its folder
HIDDEN = "***"
ELLIPSIS = "\u2026"

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s?#]*@")
_SECRET_QUERY = re.compile(r"(?i)(?P<key>[?&;][\w.-]*(?:token|key|secret|pass|pwd|auth|sig|credential)[\w.-]*=)"
                           r"[^&#\s'\"]*")
# An absolute path inside a text: a "/" not inside a URL or a word, then parts up to a space or a quote.
_ABSOLUTE = re.compile(r"(?<![\w:/.~" + ELLIPSIS + r"-])/[^\s'\"()\[\]{},;]+")


def public(value):
    """``value`` (JSON-like: dicts, lists, strings, numbers) with every string made safe to show; a new object."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, dict):
        return {key: public(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [public(item) for item in value]
    return value


def text(value: str) -> str:
    """One string made safe to show: credentials hidden, absolute paths shortened."""
    value = _USERINFO.sub(lambda m: f"{m['scheme']}{HIDDEN}@", value)
    value = _SECRET_QUERY.sub(lambda m: f"{m['key']}{HIDDEN}", value)
    if value.startswith("/") and "\n" not in value:  # the whole string is a path: spaces and all
        return short_path(value)
    return _ABSOLUTE.sub(lambda m: short_path(m.group()), value)


def short_path(path: str) -> str:
    parts = [part for part in path.split("/") if part]
    if len(parts) <= PATH_PARTS:
        return path
    return f"{ELLIPSIS}/" + "/".join(parts[-PATH_PARTS:])
