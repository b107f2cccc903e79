"""File helpers every writer in the project uses: checksums and atomic replacement.

A file written with :func:`write_atomic` is either the old one or the complete
new one, whatever happens while it is written: the bytes go to a temporary
name in the same folder, are flushed to disk, and the name is swapped in one
``rename``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder; on a clean exit it is flushed to disk and renamed to ``path``."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        temporary.chmod(0o644)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write; it replaces ``path`` when the block ends cleanly, else it is removed."""
    with _temporary_beside(Path(path)) as temporary, open(temporary, "wb") as f:
        yield f


def replace_with(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary path (for libraries that write by name), then swap it in for ``path``."""
    with _temporary_beside(Path(path)) as temporary:
        write(temporary)


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def sync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

