"""Where the store's pages lie in its data file: the GPU page path reads them with ``pread``.

LMDB's own ``map_addr`` is 0, so the offsets once computed from it pointed past the end of the
file, every ``pread`` read nothing, and every page was copied out of the memory map instead.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
from processfork.plugin import page_file
from processfork.plugin.page_file import PageFile, plan_runs
from processfork.store import Store
from processfork.store.mapping import file_map_base

PAGE = 1 << 16
PREADV = os.preadv
RUNS = 8 << 20  # bytes of pages per preadv where a test reads runs (the default reads none)


def _pages(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, PAGE, dtype=np.uint8) for _ in range(n)]


def _read_back(store: Store, digests: list[bytes]) -> list[np.ndarray | None]:
    """Each page as ``PageFile`` reads it from the data file; None where it would not."""

    def read(views: list[memoryview], base: int | None, path: str) -> list[np.ndarray | None]:
        fd = os.open(path, os.O_RDONLY)
        try:
            source = PageFile(fd, base)
            offsets = source.offsets(views)
            assert offsets is not None
            out: list[np.ndarray | None] = []
            for view, offset in zip(views, offsets):
                row = np.zeros(len(view), dtype=np.uint8)
                out.append(row if source.read_one(row, offset) else None)
            return out
        finally:
            os.close(fd)

    return store.with_page_locations(digests, read)


def test_pages_are_read_from_the_data_file_at_their_offsets(tmp_path):
    pages = _pages(6)
    with Store(tmp_path / "store") as store:
        digests = store.put_pages(pages).digests
        got = _read_back(store, digests)
    assert all(row is not None for row in got)
    for row, page in zip(got, pages):
        assert np.array_equal(row, page)


def test_the_offsets_follow_the_map_when_it_grows(tmp_path):
    """A store that outgrows its map is mapped anew, elsewhere: the base is looked up again."""
    with Store(tmp_path / "store", map_size=1 << 20) as store:
        first = _pages(4, seed=1)
        digests = store.put_pages(first).digests
        assert all(row is not None for row in _read_back(store, digests))
        size = store.env.info()["map_size"]
        more = _pages(40, seed=2)  # 2.5 MiB more: the map doubles at least once
        digests += store.put_pages(more).digests
        assert store.env.info()["map_size"] > size
        got = _read_back(store, digests)
    for row, page in zip(got, first + more):
        assert row is not None and np.array_equal(row, page)


def test_a_file_mapped_twice_or_not_at_all_has_no_base(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"x" * mmap.PAGESIZE)
    assert file_map_base(str(path)) is None
    with open(path, "rb") as f:
        one = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        base = file_map_base(str(path))
        assert base is not None
        assert base == np.frombuffer(one, dtype=np.uint8).ctypes.data
        two = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert file_map_base(str(path)) is None  # ambiguous: copy from the views instead
        two.close()
        one.close()


def test_without_a_base_pages_are_copied_from_the_map(tmp_path):
    pages = _pages(2)
    with Store(tmp_path / "store") as store:
        digests = store.put_pages(pages).digests

        def read(views: list[memoryview], base: int | None, path: str) -> list[np.ndarray]:
            fd = os.open(path, os.O_RDONLY)
            try:
                source = PageFile(fd, None)
                assert source.offsets(views) is None
                rows = [np.zeros(PAGE, dtype=np.uint8) for _ in views]
                assert list(source.read_pages(rows, views)) == [(0, 1), (1, 2)]
                return rows
            finally:
                os.close(fd)

        rows = store.with_page_locations(digests, read)
    assert all(np.array_equal(row, page) for row, page in zip(rows, pages))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_the_base_is_where_the_views_lie(tmp_path):
    with Store(tmp_path / "store") as store:
        digests = store.put_pages(_pages(3)).digests
        spans = store.with_page_locations(digests, lambda views, base, _: [
            (np.frombuffer(v, dtype=np.uint8).ctypes.data - base, len(v)) for v in views])
        size = os.path.getsize(tmp_path / "store" / "data.mdb")
    assert all(0 < offset and offset + n <= size for offset, n in spans)


# -- runs: adjacent pages read with one preadv -------------------------------------------------


def test_runs_join_pages_that_follow_each_other_closely():
    p = 100
    # 0-2 adjacent with gaps of 10, 0 and 10; 3 goes back (out of order); 4 is far after 3;
    # 5 is not in the file; 6-7 adjacent again.
    offsets = [1000, 1110, 1210, 500, 500 + p + 70_000, -1, 9000, 9100]
    assert plan_runs(offsets, p, gap_bytes=64 << 10, run_bytes=RUNS) == [
        (0, 3), (3, 4), (4, 5), (5, 6), (6, 8)]
    # A gap of exactly the bound still joins; one byte more does not.
    assert plan_runs([0, p + 64, 2 * p + 129], p, gap_bytes=64, run_bytes=RUNS) == [
        (0, 2), (2, 3)]


def test_runs_respect_the_iovec_and_byte_limits():
    p = 100
    gapped = [i * (p + 8) for i in range(10)]  # every page after the first needs 2 buffers
    assert plan_runs(gapped, p, max_iov=5, run_bytes=RUNS) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    dense = [i * p for i in range(10)]  # no gaps: one buffer a page
    assert plan_runs(dense, p, max_iov=4, run_bytes=RUNS) == [(0, 4), (4, 8), (8, 10)]
    assert plan_runs(dense, p, run_bytes=3 * p) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert plan_runs(dense, p, run_bytes=p) == [(i, i + 1) for i in range(10)]
    assert plan_runs(dense, p) == [(i, i + 1) for i in range(10)]  # the default: no runs
    assert plan_runs([], p) == []


class _Preadv:
    """``os.preadv`` as ``page_file`` calls it, recording each call's buffer count and size."""

    def __init__(self, real, fail_runs: bool = False):
        self.real, self.fail_runs, self.calls = real, fail_runs, []

    def __call__(self, fd, buffers, offset):
        self.calls.append((len(buffers), sum(memoryview(b).nbytes for b in buffers)))
        if self.fail_runs and len(buffers) > 1:
            return 0  # as a file that ends early would
        return self.real(fd, buffers, offset)


def _read_runs(store: Store, digests: list[bytes], monkeypatch, *, copies=(), base_shift=0,
               fail_runs: bool = False, **limits
               ) -> tuple[list[np.ndarray], _Preadv, list[tuple[int, int]]]:
    """Read pages through ``PageFile.read_pages``: the rows, the ``preadv`` calls and the runs
    it yielded; ``copies``: indexes handed over as a copy in memory (not in the file)."""
    spy = _Preadv(PREADV, fail_runs)
    monkeypatch.setattr(page_file.os, "preadv", spy)

    def read(views, base, path):
        fd = os.open(path, os.O_RDONLY)
        try:
            views = [memoryview(bytes(v)) if i in copies else v for i, v in enumerate(views)]
            rows = [np.zeros(len(v), dtype=np.uint8) for v in views]
            done = list(PageFile(fd, base, **{"run_bytes": RUNS, **limits}).read_pages(rows, views))
            assert [i for lo, hi in done for i in range(lo, hi)] == list(range(len(views)))
            return rows, done
        finally:
            os.close(fd)

    rows, done = store.with_page_locations(digests, read)
    return rows, spy, done


def test_a_run_is_read_with_one_preadv_and_gives_the_stored_bytes(tmp_path, monkeypatch):
    pages = _pages(12)
    with Store(tmp_path / "store") as store:
        digests = store.put_pages(pages).digests  # one commit: the values lie one after another
        rows, spy, _ = _read_runs(store, digests, monkeypatch)
        few, small, runs = _read_runs(store, digests, monkeypatch, max_iov=5)
    for got in (rows, few):
        assert all(np.array_equal(row, page) for row, page in zip(got, pages))
    assert len(spy.calls) == 1 and spy.calls[0][0] > 12  # the pages and the gaps between them
    assert runs == [(0, 3), (3, 6), (6, 9), (9, 12)]  # 3 pages and 2 gaps a call
    assert [n for n, _ in small.calls] == [5, 5, 5, 5]


def test_runs_broken_by_order_distance_or_a_page_outside_the_file(tmp_path, monkeypatch):
    first, filler, second = _pages(6, seed=1), _pages(4, seed=2), _pages(6, seed=3)
    with Store(tmp_path / "store") as store:
        a = store.put_pages(first).digests
        store.put_pages(filler)  # 256 KiB between the two commits' pages
        b = store.put_pages(second).digests
        offsets = store.with_page_locations(
            a + b, lambda views, base, _: PageFile(0, base).offsets(views))
        assert offsets[6] - offsets[5] > (64 << 10) + PAGE
        order = [0, 1, 2, 4, 3, 5]  # 4 before 3: out of order
        digests = [a[i] for i in order] + b
        expected = [first[i] for i in order] + second
        rows, spy, runs = _read_runs(store, digests, monkeypatch, copies={8})
        alone, one_each, singles = _read_runs(store, digests, monkeypatch, copies={8},
                                              run_bytes=0)
    assert all(np.array_equal(row, page) for row, page in zip(rows, expected))
    assert all(np.array_equal(row, page) for row, page in zip(alone, expected))
    assert singles == [(i, i + 1) for i in range(12)] and all(n == 1 for n, _ in one_each.calls)
    # 0-2 adjacent; 3 (a4) skips a page, 4 (a3) goes back, 5 (a5) skips one; the second commit
    # is far from the first; 8 is a copy in memory, between 6-7 and 9-11.
    assert runs == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 8), (8, 9), (9, 12)]
    assert [n // 2 + 1 for n, _ in spy.calls if n > 1] == [3, 2, 3]


def test_a_run_that_reads_short_is_read_page_by_page(tmp_path, monkeypatch):
    pages = _pages(5)
    with Store(tmp_path / "store") as store:
        digests = store.put_pages(pages).digests
        rows, spy, _ = _read_runs(store, digests, monkeypatch, fail_runs=True)
    assert all(np.array_equal(row, page) for row, page in zip(rows, pages))
    assert [n for n, _ in spy.calls] == [9, 1, 1, 1, 1, 1]


def test_offsets_are_where_each_view_starts(tmp_path):
    """The cheap data-pointer read agrees with numpy's own interface, views of one buffer at
    odd places included."""
    buffer = np.arange(1 << 12, dtype=np.uint8)
    views = [memoryview(buffer[i : i + 64]) for i in (0, 1, 7, 4000)]
    base = buffer.__array_interface__["data"][0]
    assert PageFile(0, base).offsets(views) == [0, 1, 7, 4000]
    assert PageFile(0, base + 10).offsets(views[:1]) == [-10]
