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
        self._items: deque[tuple[Any, int, bool]] = deque()  # item, size, marker?
        self._bytes = 0
        self._marks = 0  # markers and errors queued: the consumer must see them at once
        self._waiting = 0  # producers waiting for room
        self._closed = False
        lock = threading.Lock()
        self._ready = threading.Condition(lock)  # the consumer waits here
        self._room = threading.Condition(lock)  # producers wait here

    def put(self, item: Any, size: int) -> None:
        """Add `item` of `size` bytes, waiting while the feed holds `limit` bytes (an item larger
        than the limit still goes into an empty feed). FeedClosed once the consumer closed it."""
        with self._room:
            while self._bytes and self._bytes + size > self.limit and not self._closed:
                self._waiting += 1
                self._ready.notify_all()  # a consumer waiting for more takes what is there
                self._room.wait()
                self._waiting -= 1
            if self._closed:
                raise FeedClosed
            self._items.append((item, size, False))
            self._bytes += size
            self._ready.notify_all()

    def put_last(self, item: Any) -> None:
        """Add a marker or an error: never waits, so a producer can always report its end."""
        with self._ready:
            self._items.append((item, 0, True))
            self._marks += 1
            self._ready.notify_all()

    def get_many(self, max_bytes: int, min_bytes: int = 0) -> list[Any]:
        """What the feed holds, up to `max_bytes` (at least one item). Waits for one item, and
        until the feed holds `min_bytes`, a marker or an error arrives, or a producer waits for
        room (so a consumer that pays a fixed cost per call, such as a sync, pays it less often
        without ever stalling its producers)."""
        with self._ready:
            while not self._items or (
                self._bytes < min_bytes and not self._marks and not self._waiting
            ):
                self._ready.wait()
            out, taken = [], 0
            while self._items and (not out or taken + self._items[0][1] <= max_bytes):
                item, size, mark = self._items.popleft()
                out.append(item)
                taken += size
                self._marks -= mark
            self._bytes -= taken
            self._room.notify_all()
            return out

    def close(self) -> None:
        """Wake every producer waiting for room; each then stops with FeedClosed."""
        with self._room:
            self._closed = True
            self._items.clear()
            self._bytes = 0
            self._marks = 0
            self._room.notify_all()
            self._ready.notify_all()
