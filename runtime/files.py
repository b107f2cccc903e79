"""File helpers every reader and writer in the project uses: small files read safely, checksums, atomic replacement.

A file a user points at (a station file, settings, a calibration, a recipe
file) is read with :func:`read_small`: only a regular file (a FIFO is never
waited on, a device never read forever), and only up to a size.

A file written with :func:`write_atomic` is either the old one or the complete
new one, whatever happens while it is written: the bytes go to a temporary
name in the same folder, are flushed to disk, and the name is swapped in one
``rename``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


DOCUMENT_BYTES = 1 << 20  # a settings, station or calibration file is pages of text, not megabytes


def read_small(path: Path, what: str, limit: int | None = DOCUMENT_BYTES, error: type | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file when opened (not only when looked at before: a FIFO
    put in its place meanwhile would block the read), at most ``limit`` bytes (None: any size). Otherwise
    ``error`` (MradError by default) with one line naming the file as ``what`` and its path."""
    from .errors import MradError

    error = error or MradError
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens at once, and is refused below
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path} is not a regular file (a FIFO, a device or a folder is not read)")
        if limit is not None and info.st_size > limit:
            raise error(f"{what} {path} is {info.st_size:,} bytes; at most {limit:,} are read")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if limit is not None and len(data) > limit:  # grew while being read
        raise error(f"{what} {path} is over {limit:,} bytes; at most {limit:,} are read")
    return data


def read_small_text(path: Path, what: str, limit: int = DOCUMENT_BYTES) -> str:
    """As :func:`read_small`, decoded as UTF-8 text (binary, or UTF-16, is refused in one line)."""
    from .errors import MradError

    data = read_small(path, what, limit)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MradError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    if "\x00" in text:
        raise MradError(f"{what} {path} is not text: it holds NUL bytes (binary, or UTF-16?); save it as UTF-8")
    return text


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


def save_array(path: Path, array, atomic: bool = True) -> None:
    """A NumPy array file, never pickled; atomic unless it goes into a folder that is itself swapped in whole."""
    import numpy as np

    with (atomic_file(path) if atomic else open(path, "wb")) as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


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


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A hidden sibling of ``target`` to fill; swapped in for ``target`` when the block ends, removed if it raises.

    An interrupted writer thus never leaves a half-written ``target`` behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(0o755)
    try:
        yield staging
        swap_in_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_in_directory(staging: Path, target: Path) -> None:
    """Put the complete directory ``staging`` in place of ``target`` (absent, a file or a directory).

    On Linux an existing directory is exchanged with ``staging`` in one
    ``renameat2(RENAME_EXCHANGE)``, so no moment exists without a complete
    ``target``; elsewhere the old one is renamed aside first (a window of one
    rename). The old content is then removed.
    """
    staging, target = Path(staging), Path(target)
    if target.is_dir() and not target.is_symlink() and _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # staging now holds the old directory
        sync_directory(target.parent)
        return
    aside = None
    if target.exists() or target.is_symlink():
        aside = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, aside)
    os.replace(staging, target)
    sync_directory(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() and not aside.is_symlink() else aside.unlink()


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


class OutputBusy(OSError):
    """Another process holds the lock on an output file or folder."""


def _lock_exclusive(fd: int, what: str) -> None:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one writer per output is the user's to keep
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise OutputBusy(f"{what} is being written by another process; give each run its own output") from exc


def open_exclusive(path: Path) -> BinaryIO:
    """``path`` opened for writing from empty, under an exclusive lock held until it is closed.

    The lock is taken before the file is emptied, so a second writer is
    refused without having destroyed the first one's records.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        _lock_exclusive(fd, str(path))
        if stat.S_ISREG(os.fstat(fd).st_mode):  # a device or pipe (/dev/null, a FIFO) has nothing to empty
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb", buffering=0)


def lock_file(path: Path, what: str) -> BinaryIO:
    """An exclusive lock on ``what``, taken on the file ``path`` (created if need be) and held until it is closed."""
    handle = open(path, "ab")
    try:
        _lock_exclusive(handle.fileno(), what)
    except BaseException:
        handle.close()
        raise
    return handle


def lock_folder(folder: Path) -> BinaryIO:
    """An exclusive lock on an output folder (a ``.lock`` file inside it), held until the returned file is closed.

    Temporary files that a killed writer left behind are removed once the lock is held.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = lock_file(folder / ".lock", str(folder))
    for leftover in folder.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    return handle
