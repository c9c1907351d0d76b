"""The load's chunk flow: units run by many threads, chunks handed on in order, slots reused only
after the chunk that held them was handed on, and errors raised once no thread runs."""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from processfork.plugin.chunk_flow import ChunkFlow


def units_of(chunks: int, per_chunk: int) -> list[tuple[int, int, int]]:
    return [(c, c * per_chunk + i, c * per_chunk + i + 1) for c in range(chunks)
            for i in range(per_chunk)]


@pytest.mark.parametrize("lag", [1, 2, 4])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_chunks_are_handed_on_in_order_and_no_slot_is_refilled_too_early(lag, threads):
    chunks, per_chunk = 40, 5
    lock = threading.Lock()
    handed: list[int] = []
    done: set[int] = set()
    early: list[tuple[int, int]] = []
    rng = random.Random(7)
    delays = [rng.random() * 1e-3 for _ in range(chunks * per_chunk)]

    def work(c, lo, hi):
        with lock:
            if c >= lag and (c - lag) not in handed:
                early.append((c, lo))
        time.sleep(delays[lo])  # threads finish out of order
        with lock:
            done.add(lo)

    def hand(c):
        with lock:
            # every unit of the chunk is done before it is handed on
            assert all(u in done for u in range(c * per_chunk, (c + 1) * per_chunk))
            handed.append(c)

    with ThreadPoolExecutor(threads) as pool:
        ChunkFlow(units_of(chunks, per_chunk), lag=lag, work=work, hand=hand).run(pool, threads)
    assert handed == list(range(chunks))
    assert early == []


def test_free_is_called_before_a_chunks_first_unit():
    freed: list[int] = []
    order: list[str] = []

    def work(c, lo, hi):
        order.append(f"work {c}")
        assert c in freed

    with ThreadPoolExecutor(4) as pool:
        ChunkFlow(units_of(6, 3), lag=2, work=work, hand=lambda c: None,
                  free=freed.append).run(pool, 4)
    assert sorted(set(freed)) == list(range(6))


@pytest.mark.parametrize("where", ["work", "hand", "free"])
def test_the_first_error_is_raised_after_every_thread_stopped(where):
    running = [0]
    lock = threading.Lock()

    def maybe_fail(stage, c):
        if stage == where and c == 3:
            raise ValueError(f"{stage} failed on chunk {c}")

    def work(c, lo, hi):
        with lock:
            running[0] += 1
        try:
            time.sleep(1e-4)
            maybe_fail("work", c)
        finally:
            with lock:
                running[0] -= 1

    with ThreadPoolExecutor(6) as pool:
        flow = ChunkFlow(units_of(30, 4), lag=2, work=work,
                         hand=lambda c: maybe_fail("hand", c),
                         free=lambda c: maybe_fail("free", c))
        with pytest.raises(ValueError, match=f"{where} failed on chunk 3"):
            flow.run(pool, 6)
        assert running[0] == 0
