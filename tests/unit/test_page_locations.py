"""Where the store's pages lie in its data file: the GPU page path reads them with ``pread``.

LMDB's own ``map_addr`` is 0, so the offsets once computed from it pointed past the end of the
file, every ``pread`` read nothing, and every page was copied out of the memory map instead.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
from processfork.plugin.staged_pages import _PageFile
from processfork.store import Store
from processfork.store.mapping import file_map_base

PAGE = 1 << 16


def _pages(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, PAGE, dtype=np.uint8) for _ in range(n)]


def _read_back(store: Store, digests: list[bytes]) -> list[np.ndarray | None]:
    """Each page as ``_PageFile`` reads it from the data file; None where it would not."""

    def read(views: list[memoryview], base: int | None, path: str) -> list[np.ndarray | None]:
        fd = os.open(path, os.O_RDONLY)
        try:
            source = _PageFile(fd, base)
            out: list[np.ndarray | None] = []
            for view in views:
                row = np.zeros(len(view), dtype=np.uint8)
                out.append(row if source.read_into(row, view) else None)
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
    with Store(tmp_path / "store") as store:
        digests = store.put_pages(_pages(2)).digests

        def read(views: list[memoryview], base: int | None, path: str) -> bool:
            fd = os.open(path, os.O_RDONLY)
            try:
                row = np.zeros(PAGE, dtype=np.uint8)
                return _PageFile(fd, None).read_into(row, views[0])
            finally:
                os.close(fd)

        assert store.with_page_locations(digests, read) is False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_the_base_is_where_the_views_lie(tmp_path):
    with Store(tmp_path / "store") as store:
        digests = store.put_pages(_pages(3)).digests
        spans = store.with_page_locations(digests, lambda views, base, _: [
            (np.frombuffer(v, dtype=np.uint8).ctypes.data - base, len(v)) for v in views])
        size = os.path.getsize(tmp_path / "store" / "data.mdb")
    assert all(0 < offset and offset + n <= size for offset, n in spans)
