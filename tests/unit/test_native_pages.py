"""The compiled page reader: the same bytes and digests as the per-page Python calls, and the
per-page Python calls wherever it cannot be built."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from processfork.plugin import native_pages as native_module
from processfork.plugin.native_pages import MISMATCH, NOT_READ, OK, native_pages
from processfork.plugin.page_file import PageFile
from processfork.store import Store, page_digest

PAGE = 4096 + 64  # not a multiple of the file system's blocks


@pytest.fixture
def reader(native_reader):
    return native_reader


@pytest.fixture
def pages(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (6, PAGE), dtype=np.uint8)
    path = tmp_path / "pages.bin"
    path.write_bytes(rows.tobytes())
    fd = os.open(path, os.O_RDONLY)
    yield rows, fd
    os.close(fd)


def test_digests_are_xxh3_128_of_each_row_whatever_holds_the_rows(reader, pages):
    rows, _ = pages
    expected = [page_digest(row) for row in rows]
    assert reader.hash_pages(rows) == expected  # one 2-D array
    assert reader.hash_pages([rows[i] for i in (4, 0, 2)]) == [expected[i] for i in (4, 0, 2)]
    assert reader.hash_pages(rows[::2]) == expected[::2]  # rows that are not adjacent
    assert reader.hash_pages(rows[:0]) == []


def test_each_page_is_read_checked_or_reported(reader, pages):
    rows, fd = pages
    out = np.zeros_like(rows)
    digests = [page_digest(row) for row in rows]
    digests[2] = bytes(16)  # the page read is not the page asked for
    offsets = [i * PAGE for i in range(6)]
    offsets[3] = -1  # not in the file
    offsets[4] = 5 * PAGE + 10  # the file ends inside it
    status = reader.read_pages(fd, offsets, out, digests)
    assert list(status) == [OK, OK, MISMATCH, NOT_READ, NOT_READ, OK]
    for i in (0, 1, 2, 5):
        assert np.array_equal(out[i], rows[i])
    unchecked = reader.read_pages(fd, [5 * PAGE, 0], [out[3], out[4]], None)
    assert list(unchecked) == [OK, OK]
    assert np.array_equal(out[3], rows[5]) and np.array_equal(out[4], rows[0])


@pytest.mark.parametrize("page_bytes", [PAGE, 3 * (32 << 10) + 1000])  # a piece's end inside
def test_pages_copied_from_memory_are_the_same_bytes_and_checked(reader, page_bytes):
    """``copy_pages`` hashes each page a piece at a time as it copies it: the digest is the
    one-shot xxh3-128's, a page that does not match is reported, the bytes always arrive."""
    assert reader.copies_from_map
    rng = np.random.default_rng(2)
    sources = rng.integers(0, 256, (5, page_bytes), dtype=np.uint8)
    digests = [page_digest(row) for row in sources]
    digests[3] = bytes(16)
    out = np.zeros_like(sources)
    status = reader.copy_pages(sources, out, digests)
    assert list(status) == [OK, OK, OK, MISMATCH, OK]
    assert np.array_equal(out, sources)
    # Rows not 16-byte aligned (a plain copy), sources in another order, nothing checked.
    spare = np.zeros(2 * page_bytes + 3, dtype=np.uint8)
    odd = [spare[1 : 1 + page_bytes], spare[2 + page_bytes : 2 + 2 * page_bytes]]
    status = reader.copy_pages([sources[4], sources[0]], odd, None, populate=False,
                               streaming_stores=False)
    assert list(status) == [OK, OK]
    assert np.array_equal(odd[0], sources[4]) and np.array_equal(odd[1], sources[0])
    with pytest.raises(ValueError, match="stored page of"):
        reader.copy_pages([sources[0][:-1]], out[:1], None)


def test_one_digest_per_page_is_required(reader, pages):
    rows, fd = pages
    with pytest.raises(ValueError, match="one 16-byte digest per page"):
        reader.read_pages(fd, [0, PAGE], rows[:2], [page_digest(rows[0])])


def test_the_store_reads_the_same_with_and_without_it(reader, tmp_path):
    """Through ``PageFile.read_checked`` on a real store: a page the reader cannot take from the
    file is copied from the map and still checked."""
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, (8, PAGE), dtype=np.uint8)
    with Store(tmp_path / "store") as store:
        digests = store.put_pages_hashed([(page_digest(r), memoryview(r)) for r in rows]).digests
        wanted = list(digests)
        wanted[6] = bytes(16)

        def read(native, views, base, path):
            fd = os.open(path, os.O_RDONLY)
            try:
                got = np.zeros_like(rows)
                source = PageFile(fd, base, native=native)
                views = list(views)
                bad = source.read_checked(got, views, wanted)
                # A page outside the file (its offset negative): the map gives it.
                shifted = PageFile(fd, None if base is None else base + (1 << 60),
                                   native=native)
                again = np.zeros_like(rows)
                bad_again = shifted.read_checked(again, views, wanted)
                return got, bad, again, bad_again
            finally:
                os.close(fd)

        for native in (reader, None):
            got, bad, again, bad_again = store.with_page_locations(
                digests, lambda views, base, path, n=native: read(n, views, base, path))
            assert bad == [6] and bad_again == [6]
            assert np.array_equal(got, rows) and np.array_equal(again, rows)

        def copied(views, base, path):
            got = np.zeros_like(rows)
            bad = PageFile(None, base, native=reader, from_map=True).read_checked(
                got, list(views), wanted)
            return got, bad

        got, bad = store.with_page_locations(digests, copied)  # out of the map, no file
        assert bad == [6] and np.array_equal(got, rows)


def test_without_a_compiler_or_when_turned_off_there_is_no_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("PROCESSFORK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native_module.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(native_module, "_loaded", [])

    def no_compiler() -> list[str]:
        raise OSError("no C compiler found (set CC)")

    monkeypatch.setattr(native_module, "_compiler", no_compiler)
    assert native_pages() is None
    monkeypatch.setattr(native_module, "_loaded", [])
    monkeypatch.setenv("PROCESSFORK_NATIVE_PAGES", "0")
    assert native_module._load() is None


def test_a_failed_build_leaves_nothing_behind_and_a_build_is_reused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PROCESSFORK_CACHE_DIR", str(cache))
    monkeypatch.setattr(native_module.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(OSError):
        native_module._compiled()
    assert list(cache.iterdir()) == []
    monkeypatch.delenv("CC")
    built = native_module._compiled()
    assert built.parent == cache and built.exists()
    calls: list[object] = []
    monkeypatch.setattr(native_module.subprocess, "run",
                        lambda *a, **k: calls.append(a) or subprocess.CompletedProcess(a, 0))
    assert native_module._compiled() == built and not calls
