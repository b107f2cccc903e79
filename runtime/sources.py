"""Where frames come from: image files, folders and glob patterns."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MradError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def expand_inputs(inputs: Iterable[str]) -> Iterator[Path]:
    """Yield image paths: files as given, folders walked in sorted order, globs expanded into either."""
    for item in inputs:
        if Path(item).exists():
            matches = [item]
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise MradError(f"--input {item!r} matches no file")
        else:
            raise MradError(f"--input {item} does not exist")
        for match in map(Path, matches):
            if match.is_dir():
                yield from sorted(p for p in match.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            else:
                yield match
