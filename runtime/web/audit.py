"""The operator page's audit log: append-only JSON lines, each written to disk before the change it records.

    python -m mrad.runtime.web.audit verify bundles/tiny.operator/audit.jsonl

Each entry is one line of JSON with the time, the operator, the action and
what it is about, and ``prev``: the SHA-256 (hex) of the line before it as
stored, without its newline (:data:`GENESIS` for the first line). Editing,
deleting or inserting a line breaks the link of the line after it, and
``verify`` names that line. A log cut at its end (entries removed from the
end, the newest first) still verifies: compare the head it prints (the last
line's SHA-256, also on the page) with one noted elsewhere.

An append is one ``write`` of one whole line, then ``fsync``, under an
exclusive lock (``flock``: two processes sharing a log keep one chain). A
file that does not end with a newline (a write cut by a crash, or a full
disk) gets one first, so the damaged line stays a line of its own and never
swallows the next entry. A write that fails raises :class:`AuditError`: the
caller applies nothing (see :mod:`~mrad.runtime.web.teach`).
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MradError
from ..line.records import now

GENESIS = "0" * 64  # the prev of a log's first entry
SHOWN = 20  # entries of the log the page shows
READ_BACK_BYTES = 64 * 1024  # the end of the file is read back this much at a time to find its last line
EXIT_DAMAGED = 1  # mrad-audit verify: the chain is broken (0: intact, 2: the file cannot be read)


class AuditError(MradError):
    """The audit log cannot be written: whatever was to be recorded must not be applied."""


def digest(line: bytes) -> str:
    """What the next entry's ``prev`` holds: the SHA-256 of a line as stored, without its newline."""
    return hashlib.sha256(line).hexdigest()


class AuditLog:
    """An append-only, hash-chained JSON lines file; its last entries are kept for the page (read back at start)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tail: collections.deque[dict] = collections.deque(maxlen=SHOWN)
        self.appended = 0  # entries written by this run: a browser's stream is pushed a change when it grows
        self.head = GENESIS  # the last line's digest: what the next entry links to
        if self.path.is_file():
            self._read_back()

    def _read_back(self) -> None:
        with open(self.path, "rb") as f:
            for raw in f:
                line = raw.rstrip(b"\n")
                self.head = digest(line)
                try:
                    entry = json.loads(line)
                except ValueError:  # a damaged line: verify names it; the page skips it
                    continue
                if isinstance(entry, dict):
                    self.tail.append(entry)

    def append(self, operator: str, action: str, **what) -> dict:
        """Write one entry and make it durable (fsync) before returning it; :class:`AuditError` if it cannot be."""
        entry = {"time": now(), "operator": operator, "action": action, **what}
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise AuditError(f"the audit log ({self.path.name}) cannot be opened: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time: the chain stays one chain
            line = self._write(fd, entry)
        finally:
            os.close(fd)  # the lock goes with it
        if created:
            _sync_folder(self.path.parent)
        self.head = digest(line)
        self.tail.append(entry)
        self.appended += 1
        return entry

    def _write(self, fd: int, entry: dict) -> bytes:
        size = os.fstat(fd).st_size
        last, whole = _last_line(fd, size)
        entry["prev"] = digest(last) if last is not None else GENESIS
        line = json.dumps(entry, separators=(", ", ": ")).encode()
        data = (b"" if whole else b"\n") + line + b"\n"  # a damaged last line stays a line of its own
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"{written} of {len(data)} bytes written (disk full?)")
            os.fsync(fd)
        except OSError as exc:
            _cut_back(fd, size)
            raise AuditError(f"the audit log ({self.path.name}) cannot be written: "
                             f"{getattr(exc, 'strerror', None) or exc}") from exc
        return line


def _last_line(fd: int, size: int) -> tuple[bytes | None, bool]:
    """The file's last line (without its newline; None when empty), and whether the file ends with a newline."""
    if size == 0:
        return None, True
    whole = os.pread(fd, 1, size - 1) == b"\n"
    pos = size - 1 if whole else size  # where the last line ends
    rest = b""
    while pos > 0:
        start = max(0, pos - READ_BACK_BYTES)
        chunk = os.pread(fd, pos - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return chunk[cut + 1:] + rest, whole
        rest, pos = chunk + rest, start
    return rest, whole


def _cut_back(fd: int, size: int) -> None:
    """Undo a partial write (best effort): the log stays as it was before this entry."""
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass  # the damaged tail then stays; the next append begins on a new line


def _sync_folder(folder: Path) -> None:
    """A new file's name is durable only once its folder is synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the file's own data is synced
    finally:
        os.close(fd)


# -- verification ------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What :func:`verify` found: the entries that link, the problems (each naming its line), the head."""

    lines: int = 0
    entries: int = 0
    problems: list[str] = field(default_factory=list)
    head: str = GENESIS

    @property
    def intact(self) -> bool:
        return not self.problems


def verify(path: Path) -> Verdict:
    """Check every line of an audit log: JSON, and linked to the line before it (``prev``)."""
    verdict = Verdict()
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    ends_whole = lines[-1] == b""
    if ends_whole:
        lines.pop()
    previous = GENESIS
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        problem = _check(number, line, previous, seen)
        if problem:
            verdict.problems.append(problem)
        else:
            verdict.entries += 1
        previous = digest(line)
        seen.add(previous)
    if not ends_whole:
        verdict.problems.append(f"line {len(lines)}: cut short (no newline at its end): a write was interrupted")
    verdict.lines, verdict.head = len(lines), previous
    return verdict


def _check(number: int, line: bytes, previous: str, seen: set[str]) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return f"line {number}: not a JSON entry (damaged, or edited by hand)"
    if not isinstance(entry, dict) or "prev" not in entry:
        return f"line {number}: not a chained entry (no prev; written before the log was chained, or forged)"
    if entry["prev"] != previous:
        where = ("the log does not begin here: lines were removed from its start" if number == 1 else
                 f"line {number - 1} was edited, or lines were removed or inserted before line {number}")
        return f"line {number}: prev does not match: {where}"
    if "of" in entry and entry["of"] not in seen:
        return f"line {number}: the request it answers (of {str(entry['of'])[:16]}...) is not in the log before it"
    return None


def main(argv: list[str] | None = None) -> int:
    """``verify FILE``: say whether the log is intact; each problem on a line of its own, with its line number."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "verify":
        print("usage: python -m mrad.runtime.web.audit verify <audit.jsonl>  (exit 0: intact, "
              f"{EXIT_DAMAGED}: damaged, 2: unreadable)", file=sys.stderr)
        return 2
    try:
        verdict = verify(Path(args[1]))
    except OSError as exc:
        print(f"error: {args[1]} cannot be read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for problem in verdict.problems:
        print(f"{args[1]}: {problem}")
    state = "intact" if verdict.intact else f"DAMAGED ({len(verdict.problems)} problems)"
    print(f"{args[1]}: {verdict.entries} of {verdict.lines} lines chained, {state}; head {verdict.head}")
    return 0 if verdict.intact else EXIT_DAMAGED


if __name__ == "__main__":
    sys.exit(main())
