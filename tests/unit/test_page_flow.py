"""The load's page flow in C: every page lands in its chunk's slot row, checked, and a slot is
never refilled before the caller released it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from processfork.plugin.native_pages import view_addresses
from processfork.store import page_digest

PAGE = 4096 + 64


@pytest.fixture
def native(native_reader):
    return native_reader


def addresses(rows: np.ndarray) -> np.ndarray:
    return np.uint64(rows.ctypes.data) + np.uint64(rows.shape[1]) * np.arange(len(rows),
                                                                            dtype=np.uint64)


def test_view_addresses_are_where_the_views_bytes_are():
    rows = np.random.default_rng(3).integers(0, 256, (5, PAGE), dtype=np.uint8)
    raw = rows.tobytes()
    views = [memoryview(raw)[i * PAGE : (i + 1) * PAGE] for i in range(5)]
    portable = [np.frombuffer(v, np.uint8).__array_interface__["data"][0] for v in views]
    assert view_addresses(views).tolist() == portable
    assert view_addresses([]).tolist() == []


def run_flow(native, sources, expected, *, rows, slots, threads, unit_pages, stream=True):
    """Hand each chunk on as the load does: returns each chunk's rows as handed on."""
    staging = [np.zeros((rows, PAGE), dtype=np.uint8) for _ in range(slots)]
    flow = native.flow(addresses(sources),
                       staging, expected, unit_pages=unit_pages,
                       streaming_stores=stream)
    handed = []
    with ThreadPoolExecutor(threads) as pool:
        runners = [pool.submit(flow.work) for _ in range(threads)]
        for c in range(flow.chunks):
            flow.wait(c)
            n = min(rows, len(sources) - c * rows)
            handed.append(staging[c % slots][:n].copy())
            if c + slots < flow.chunks:
                flow.release(c + slots)
        for runner in runners:
            runner.result()
    wrong = flow.mismatched()
    flow.close()
    return handed, wrong


@pytest.mark.parametrize("rows,slots,threads,unit_pages", [
    (4, 2, 3, 2), (6, 3, 8, 2), (8, 4, 2, 4), (5, 1, 4, 2), (64, 2, 4, 6)])
def test_every_page_reaches_its_chunk_in_order(native, rows, slots, threads, unit_pages):
    rng = np.random.default_rng(rows * 10 + slots)
    sources = rng.integers(0, 256, (37, PAGE), dtype=np.uint8)
    expected = [page_digest(row) for row in sources]
    handed, wrong = run_flow(native, sources, expected, rows=rows, slots=slots,
                             threads=threads, unit_pages=unit_pages)
    assert wrong == []
    np.testing.assert_array_equal(np.concatenate(handed), sources)


def test_a_page_that_does_not_match_is_named_and_still_copied(native):
    rng = np.random.default_rng(1)
    sources = rng.integers(0, 256, (20, PAGE), dtype=np.uint8)
    expected = [page_digest(row) for row in sources]
    sources[7, 100] ^= 1
    sources[16, 0] ^= 0x80
    handed, wrong = run_flow(native, sources, expected, rows=4, slots=2, threads=4,
                             unit_pages=2, stream=False)
    assert wrong == [7, 16]
    np.testing.assert_array_equal(np.concatenate(handed), sources)
    _, unchecked = run_flow(native, sources, None, rows=4, slots=2, threads=4, unit_pages=2)
    assert unchecked == []


def test_a_slot_is_not_refilled_before_it_is_released(native):
    rng = np.random.default_rng(2)
    sources = rng.integers(0, 256, (12, PAGE), dtype=np.uint8)
    staging = [np.zeros((2, PAGE), dtype=np.uint8) for _ in range(2)]
    flow = native.flow(addresses(sources),
                       staging, None, unit_pages=2)
    with ThreadPoolExecutor(4) as pool:
        runners = [pool.submit(flow.work) for _ in range(4)]
        flow.wait(0)
        flow.wait(1)
        time.sleep(0.2)  # time for a thread that ignored the release to overwrite slot 0
        np.testing.assert_array_equal(staging[0], sources[0:2])
        np.testing.assert_array_equal(staging[1], sources[2:4])
        flow.release(2)
        flow.wait(2)
        np.testing.assert_array_equal(staging[0], sources[4:6])
        np.testing.assert_array_equal(staging[1], sources[2:4])  # chunk 3 is not released yet
        flow.cancel()
        for runner in runners:
            runner.result()
    with pytest.raises(RuntimeError, match="stopped before chunk 3"):
        flow.wait(3)
    flow.close()
