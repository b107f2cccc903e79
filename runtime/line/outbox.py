"""The one queue between the line and a far end (an MQTT broker, a webhook receiver, a browser): bounded, and never
blocking the inspection thread that fills it.

When it is full, putting drops the oldest waiting item and counts it: a live
line wants its newest verdicts delivered, and a far end that stays away must
not grow memory (or a disk) without end. The first drop of an outage is
reported once (:meth:`Outbox.put` says so); a delivery ends the outage. The
items wait in a store: in memory by default, or one that outlasts the process
(MQTT's SQLite spool), with the same five verbs.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Protocol


class Store(Protocol):
    """Where an outbox's items wait, oldest first. ``take`` hands out (key, item) pairs; ``done(key)`` forgets one
    that was delivered (a store that keeps items until delivered, like a spool, needs it)."""

    def __len__(self) -> int: ...
    def put(self, item: Any) -> None: ...
    def take(self, n: int) -> list[tuple[Any, Any]]: ...
    def done(self, key: Any) -> None: ...
    def drop_oldest(self) -> None: ...
    def close(self) -> None: ...


class InMemory:
    """Items waiting in memory, oldest first: lost if the process ends."""

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._keys = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return (item for _, item in self._items)

    def put(self, item: Any) -> None:
        self._items.append((next(self._keys), item))

    def take(self, n: int) -> list[tuple[Any, Any]]:
        return [self._items.popleft() for _ in range(min(n, len(self._items)))]

    def done(self, key: Any) -> None:
        pass

    def drop_oldest(self) -> None:
        self._items.popleft()

    def close(self) -> None:
        self._items.clear()


class Outbox:
    """At most ``size`` items waiting in ``store`` (default: in memory); see the module's docstring.

    Not locked: its owner (a sink) guards it with the lock it already holds around its own state.
    """

    def __init__(self, size: int, store: Store | None = None):
        if size < 1:
            raise ValueError(f"an outbox holds at least one item, not {size}")
        self.size, self.store = size, store if store is not None else InMemory()
        self.dropped = 0  # items dropped unsent, over the outbox's life
        self._dropping = False  # within an outage: drops already reported

    def __len__(self) -> int:
        return len(self.store)

    def put(self, item: Any) -> bool:
        """Queue ``item``, dropping the oldest when full; True when this put began an outage's dropping."""
        began = False
        if len(self.store) >= self.size:
            self.store.drop_oldest()
            self.dropped += 1
            began, self._dropping = not self._dropping, True
        self.store.put(item)
        return began

    def take(self, n: int = 1) -> list[tuple[Any, Any]]:
        """Up to ``n`` (key, item) pairs, oldest first, handed out for delivery."""
        return self.store.take(n)

    def delivered(self, key: Any = None) -> None:
        """An item reached the far end: the store forgets it, and an outage (if any) is over."""
        if key is not None:
            self.store.done(key)
        self._dropping = False

    def clear(self) -> int:
        """Forget every waiting item; how many there were."""
        left = len(self.store)
        self.store.take(left)
        return left

    def close(self) -> None:
        self.store.close()
