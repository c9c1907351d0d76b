"""The store's zero-copy page paths used by the engine worker: streamed puts, records committed
with their pages, page views, and snapshot commits that drop writers' records."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest
from processfork.store import (
    Manifest,
    MissingObject,
    SnapshotSequence,
    Store,
    page_digest,
)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as s:
        yield s


def _pages(n: int, size: int = 4096, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(n)]


def test_put_pages_from_reuses_one_buffer(store):
    pages = _pages(6)
    pages[4] = pages[1]  # a duplicate inside the batch is stored once
    buf = np.empty(4096, dtype=np.uint8)

    def page(i: int) -> np.ndarray:
        buf[:] = np.frombuffer(pages[i], dtype=np.uint8)
        return buf

    result = store.put_pages_from(len(pages), page, pin="job")
    assert result.digests == [page_digest(p) for p in pages]
    assert result.new == [True, True, True, True, False, True]
    assert result.bytes_written == 5 * 4096
    assert [store.get_page(d) for d in result.digests] == pages
    assert set(store.get_pin("job")) == set(result.digests)
    again = store.put_pages_from(len(pages), page)
    assert again.new == [False] * 6 and again.bytes_written == 0


def test_put_pages_from_reruns_after_map_growth(tmp_path):
    """A transaction that grows the map runs again from page(0): the result counts each once."""
    calls: list[int] = []
    pages = _pages(40, size=64 * 1024, seed=1)

    def page(i: int) -> bytes:
        calls.append(i)
        return pages[i]

    with Store(tmp_path / "small", map_size=1 << 20) as store:
        result = store.put_pages_from(len(pages), page)
        assert result.new == [True] * 40 and result.bytes_written == 40 * 64 * 1024
        assert calls.count(0) >= 2  # it did rerun
        assert all(store.get_page(page_digest(p)) == p for p in pages)


def test_meta_commits_with_the_pages(store):
    seen = []

    def meta(result):
        seen.append(result)
        return {"job:a": {"new": sum(result.new), "bytes": result.bytes_written}}

    result = store.put_pages(_pages(3), meta=meta)
    assert store.meta_get("job:a") == {"new": 3, "bytes": result.bytes_written}
    assert len(seen) == 1
    store.put_pages_from(2, lambda i: _pages(2, seed=5)[i],
                         meta=lambda r: {"job:b": {"n": len(r.digests)}})
    assert store.meta_get("job:b") == {"n": 2}


def test_failing_meta_rolls_back_the_pages(store):
    pages = _pages(2, seed=9)

    def meta(result):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.put_pages(pages, pin="p", meta=meta)
    assert store.has_pages([page_digest(p) for p in pages]) == [False, False]
    assert store.get_pin("p") == []


def test_with_page_views_is_zero_copy_and_checks_presence(store):
    pages = _pages(3, seed=3)
    digests = store.put_pages(pages).digests
    out = store.with_page_views(digests, lambda views: [bytes(v) for v in views])
    assert out == pages
    kinds = store.with_page_views(digests[:1], lambda views: type(views[0]))
    assert kinds is memoryview
    with pytest.raises(MissingObject):
        store.with_page_views([digests[0], b"\x00" * 16], lambda views: None)


def test_write_snapshot_drops_pins_and_records(store):
    result = store.put_pages(_pages(2, seed=4), pin="job", meta=lambda r: {"job:x": {"ok": 1}})
    tokens = store.put_tokens([1, 2, 3], pin="job.tokens")
    k, v = (d.hex() for d in result.digests)
    manifest = Manifest(name="s", parents=[], fingerprint={"model": "m"},
                        sequences=[SnapshotSequence(tokens=tokens, pages=[(k, v)])])
    store.write_snapshot(manifest, ref="s", drop_pins=["job", "job.tokens"], drop_meta=["job:x"])
    assert store.meta_get("job:x") is None
    assert store.list_pins() == {}
    assert store.get_snapshot(store.resolve("s")).sequences[0].pages == [(k, v)]


def test_lmdb_copies_values_at_put(tmp_path):
    """put_pages_from relies on LMDB copying a value during put (the buffer is reused)."""
    env = lmdb.open(str(tmp_path / "raw"), map_size=1 << 24)
    buf = bytearray(b"a" * 8192)
    with env.begin(write=True) as txn:
        txn.put(b"k", buf)
        buf[:] = b"b" * 8192
    with env.begin() as txn:
        assert txn.get(b"k") == b"a" * 8192
    env.close()
