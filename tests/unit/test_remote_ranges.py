"""How a fetch cuts its objects into range reads, and the queue that bounds what the range reads
hold for the store's writes."""

from __future__ import annotations

import threading
import time

import pytest
from processfork.store.remote.feed import Feed, FeedClosed
from processfork.store.remote.pack import PackEntry
from processfork.store.remote.remote import RANGE_GAP, RANGE_MIN, plan_ranges

MiB = 1 << 20
PAGE = 384 << 10


def _pack(count: int, size: int = PAGE, start: int = 0) -> list[PackEntry]:
    return [PackEntry("p", f"{i:032x}", start + i * size, size) for i in range(count)]


def _covered(ranges: list[tuple[str, list[PackEntry]]]) -> list[PackEntry]:
    return [e for _, group in ranges for e in group]


def test_whole_packs_when_there_are_enough_for_every_connection() -> None:
    packs = {f"pack{i}": _pack(171) for i in range(6)}  # 6 packs of 64 MiB, a 384 MiB fetch
    total = sum(e.length for es in packs.values() for e in es)
    ranges = plan_ranges(packs, total, 8)
    assert len(ranges) == 6
    assert sorted(_covered(ranges), key=lambda e: (e.offset, e.key)) == sorted(
        (e for es in packs.values() for e in es), key=lambda e: (e.offset, e.key))


def test_one_pack_is_cut_so_that_every_connection_has_work() -> None:
    entries = _pack(171)  # 64 MiB
    ranges = plan_ranges({"p": entries}, 171 * PAGE, 8)
    assert len(ranges) == 8
    assert _covered(ranges) == entries  # in order, each once
    sizes = [g[-1].end - g[0].offset for _, g in ranges]
    assert max(sizes) - min(sizes) <= PAGE  # even pieces
    assert min(sizes) >= RANGE_MIN - PAGE


def test_small_fetches_are_not_cut_below_the_minimum() -> None:
    entries = _pack(10)  # under 4 MiB
    assert plan_ranges({"p": entries}, 10 * PAGE, 8) == [("p", entries)]


def test_a_gap_wider_than_the_merge_limit_starts_a_new_read() -> None:
    near = _pack(2)
    far = _pack(2, start=near[-1].end + RANGE_GAP + 1)
    close = _pack(1, start=far[-1].end + RANGE_GAP)
    ranges = plan_ranges({"p": far + close + near}, 5 * PAGE, 8)
    assert [g for _, g in ranges] == [near, far + close]


def test_the_feed_holds_at_most_its_limit_and_hands_out_batches() -> None:
    feed = Feed(4 * MiB)
    for i in range(4):
        feed.put(i, MiB)
    started = threading.Event()
    done = threading.Event()

    def producer() -> None:
        started.set()
        feed.put("late", MiB)  # over the limit: waits for the consumer
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    started.wait()
    time.sleep(0.2)
    assert not done.is_set()
    assert feed.get_many(2 * MiB) == [0, 1]
    thread.join(10)
    assert done.is_set()
    assert feed.get_many(100 * MiB) == [2, 3, "late"]


def test_a_closed_feed_stops_its_producers() -> None:
    feed = Feed(MiB)
    feed.put("first", 2 * MiB)  # one item bigger than the limit still goes in
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            feed.put("second", MiB)
        except FeedClosed as exc:
            errors.append(exc)

    thread = threading.Thread(target=producer)
    thread.start()
    time.sleep(0.1)
    feed.close()
    thread.join(10)
    assert len(errors) == 1
    with pytest.raises(FeedClosed):
        feed.put("third", 1)


def _get_many_in_thread(feed: Feed, max_bytes: int, min_bytes: int) -> tuple[threading.Thread, list]:
    got: list = []
    thread = threading.Thread(target=lambda: got.append(feed.get_many(max_bytes, min_bytes)))
    thread.start()
    return thread, got


def test_a_consumer_with_a_minimum_waits_for_that_much() -> None:
    feed = Feed(64 * MiB)
    feed.put("a", MiB)
    thread, got = _get_many_in_thread(feed, 64 * MiB, 3 * MiB)
    time.sleep(0.2)
    assert got == []  # 1 MiB of the 3 it waits for
    feed.put("b", MiB)
    time.sleep(0.2)
    assert got == []
    feed.put("c", MiB)
    thread.join(10)
    assert got == [["a", "b", "c"]]


def test_a_marker_or_an_error_ends_the_wait_for_the_minimum() -> None:
    feed = Feed(64 * MiB)
    feed.put("a", MiB)
    thread, got = _get_many_in_thread(feed, 64 * MiB, 32 * MiB)
    time.sleep(0.1)
    error = RuntimeError("range read failed")
    feed.put_last(error)
    thread.join(10)
    assert got == [["a", error]]
    # An empty object is data, not a marker: it does not end the wait.
    feed.put("empty", 0)
    thread, got = _get_many_in_thread(feed, 64 * MiB, 32 * MiB)
    time.sleep(0.2)
    assert got == []
    feed.put_last("done")
    thread.join(10)
    assert got == [["empty", "done"]]


def test_a_producer_waiting_for_room_ends_the_wait_for_the_minimum() -> None:
    """An object too big for what is left of the limit would never arrive while the consumer
    waits for its minimum: the consumer takes what is there instead of deadlocking."""
    feed = Feed(4 * MiB)
    feed.put("small", MiB)
    producer = threading.Thread(target=lambda: feed.put("big", 4 * MiB))
    producer.start()
    thread, got = _get_many_in_thread(feed, 64 * MiB, 3 * MiB)
    thread.join(10)
    assert got == [["small"]]
    producer.join(10)
    assert feed.get_many(64 * MiB) == ["big"]
