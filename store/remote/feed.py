"""A queue between the threads that download a remote's objects and the one that stores them,
bounded by the bytes it holds, so downloads run ahead of the store's writes by at most that much
(and wait, holding their connection, when the writes fall behind)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

__all__ = ["Feed", "FeedClosed"]


class FeedClosed(Exception):
    """The consumer went away (it failed, or stopped reading): producers stop."""


class Feed:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[tuple[Any, int]] = deque()
        self._bytes = 0
        self._closed = False
        self._cond = threading.Condition()

    def put(self, item: Any, size: int) -> None:
        """Add `item` of `size` bytes, waiting while the feed holds `limit` bytes (an item larger
        than the limit still goes into an empty feed). FeedClosed once the consumer closed it."""
        with self._cond:
            while self._bytes and self._bytes + size > self.limit and not self._closed:
                self._cond.wait()
            if self._closed:
                raise FeedClosed
            self._items.append((item, size))
            self._bytes += size
            self._cond.notify_all()

    def put_last(self, item: Any) -> None:
        """Add a marker or an error: never waits, so a producer can always report its end."""
        with self._cond:
            self._items.append((item, 0))
            self._cond.notify_all()

    def get_many(self, max_bytes: int) -> list[Any]:
        """What the feed holds, up to `max_bytes` (at least one item); waits for one."""
        with self._cond:
            while not self._items:
                self._cond.wait()
            out, taken = [], 0
            while self._items and (not out or taken + self._items[0][1] <= max_bytes):
                item, size = self._items.popleft()
                out.append(item)
                taken += size
            self._bytes -= taken
            self._cond.notify_all()
            return out

    def close(self) -> None:
        """Wake every producer waiting for room; each then stops with FeedClosed."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()
