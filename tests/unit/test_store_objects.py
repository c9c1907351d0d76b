"""Pages, blobs, tokens, pins and meta of a real LMDB store: round trips, dedupe, verification."""

from __future__ import annotations

import json
import os

import lmdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processfork.store import (
    CorruptPage,
    InvalidDigest,
    InvalidName,
    MissingObject,
    PageSizeMismatch,
    ReadOnlyStore,
    Store,
    StoreError,
    StoreNotFound,
    TokenRef,
    UnsupportedFormat,
    page_digest,
)

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as s:
        yield s


@SETTINGS
@given(pages=st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=12))
def test_pages_round_trip_and_dedupe(store, pages):
    present = store.has_pages([page_digest(p) for p in pages])
    result = store.put_pages(pages)
    assert result.digests == [page_digest(p) for p in pages]
    seen: set[bytes] = set()
    expected_new = []
    for digest, was_present in zip(result.digests, present):
        expected_new.append(not was_present and digest not in seen)
        seen.add(digest)
    assert result.new == expected_new
    assert result.bytes_written == sum(len(p) for p, n in zip(pages, expected_new) if n)
    for p, d in zip(pages, result.digests):
        assert store.get_page(d) == p
    again = store.put_pages(pages)
    assert again.new == [False] * len(pages)
    assert again.bytes_written == 0


def test_same_page_twice_in_one_call_is_stored_once(store):
    page = os.urandom(4096)
    result = store.put_pages([page, page, bytearray(page)])
    assert result.new == [True, False, False]
    assert result.bytes_written == 4096
    assert store.status().num_pages == 1


def test_numpy_and_memoryview_pages_are_stored_without_reshaping(store):
    arr = np.arange(64, dtype=np.float32).reshape(4, 16)
    view = memoryview(os.urandom(128))
    result = store.put_pages([arr, view, arr[:, :8]])  # the last one is not contiguous
    assert store.get_page(result.digests[0]) == arr.tobytes()
    assert store.get_page(result.digests[1]) == view.tobytes()
    assert store.get_page(result.digests[2]) == np.ascontiguousarray(arr[:, :8]).tobytes()
    assert result.bytes_written == arr.nbytes + 128 + arr.nbytes // 2


def test_put_pages_hashed_trusts_given_digests_and_skips_existing(store):
    pages = [os.urandom(512) for _ in range(3)]
    first = store.put_pages_hashed([(page_digest(p), p) for p in pages])
    assert first.new == [True, True, True]
    second = store.put_pages_hashed([(page_digest(p), p) for p in pages])
    assert second.new == [False, False, False] and second.bytes_written == 0
    with pytest.raises(InvalidDigest):
        store.put_pages_hashed([(b"short", pages[0])])


def test_a_page_given_without_bytes_must_be_stored_and_is_pinned(store):
    """A writer that saw its pages in the store hands digests only; the put checks again."""
    pages = [os.urandom(512) for _ in range(2)]
    store.put_pages_hashed([(page_digest(p), p) for p in pages])
    again = store.put_pages_hashed([(page_digest(p), None) for p in pages], pin="job")
    assert again.new == [False, False] and again.bytes_written == 0
    assert store.get_pin("job") == [page_digest(p) for p in pages]
    gone = os.urandom(512)
    with pytest.raises(MissingObject):  # e.g. gc deleted it after the writer looked
        store.put_pages_hashed([(page_digest(gone), None), (page_digest(pages[0]), pages[0])],
                               pin="job2")
    assert store.get_pin("job2") == []  # nothing of the failed put committed


@SETTINGS
@given(
    page_size=st.sampled_from([16, 256, 4096]),
    n=st.integers(1, 8),
    order=st.randoms(use_true_random=False),
)
def test_read_pages_into_copies_each_page_to_its_slot(store, page_size, n, order):
    pages = [os.urandom(page_size) for _ in range(n)]
    digests = store.put_pages(pages).digests
    idx = list(range(n)) * 2
    order.shuffle(idx)
    for out in (np.zeros(len(idx) * page_size, dtype=np.uint8), bytearray(len(idx) * page_size)):
        store.read_pages_into([digests[i] for i in idx], out, page_size)
        assert bytes(out) == b"".join(pages[i] for i in idx)
    view = memoryview(bytearray(len(idx) * page_size))
    store.read_pages_into([digests[i] for i in idx], view, page_size, verify=False)
    assert view.tobytes() == b"".join(pages[i] for i in idx)


def test_read_pages_into_reports_missing_wrong_size_and_small_buffer(store):
    d = store.put_pages([b"x" * 64]).digests[0]
    out = np.zeros(128, dtype=np.uint8)
    with pytest.raises(MissingObject) as missing:
        store.read_pages_into([d, b"\0" * 16], out, 64)
    assert missing.value.kind == "page" and "missing page" in str(missing.value)
    with pytest.raises(PageSizeMismatch):
        store.read_pages_into([d], out, 32)
    with pytest.raises(ValueError):
        store.read_pages_into([d, d, d], out, 64)


def _overwrite_page(path, digest: bytes, data: bytes) -> None:
    env = lmdb.open(str(path), max_dbs=16)
    db = env.open_db(b"pages", create=False)
    with env.begin(write=True) as txn:
        txn.put(digest, data, db=db)
    env.close()


def test_corrupt_page_is_detected_on_read(tmp_path):
    path = tmp_path / "s"
    with Store(path) as s:
        d = s.put_pages([b"a" * 128]).digests[0]
    _overwrite_page(path, d, b"b" * 128)
    with Store(path) as s:
        with pytest.raises(CorruptPage) as err:
            s.get_page(d)
        assert err.value.actual == page_digest(b"b" * 128).hex()
        with pytest.raises(CorruptPage):
            s.read_pages_into([d], np.zeros(128, dtype=np.uint8), 128)
        out = np.zeros(128, dtype=np.uint8)
        s.read_pages_into([d], out, 128, verify=False)
        assert out.tobytes() == b"b" * 128


@SETTINGS
@given(data=st.binary(max_size=5000))
def test_blobs_round_trip(store, data):
    d = store.put_blob(data)
    assert d == page_digest(data)
    assert store.get_blob(d) == data
    assert store.has_blob(d)


@SETTINGS
@given(tokens=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=300))
def test_tokens_round_trip_as_int32_le(store, tokens):
    ref = store.put_tokens(tokens)
    assert ref.count == len(tokens)
    assert store.get_tokens(ref) == tokens
    assert store.get_tokens(ref.digest) == tokens
    assert store.get_blob(bytes.fromhex(ref.digest)) == np.asarray(tokens, dtype="<i4").tobytes()


def test_tokens_out_of_int32_range_are_refused(store):
    with pytest.raises(ValueError):
        store.put_tokens([2**31])
    with pytest.raises(ValueError):
        store.put_tokens(np.array([1.5]))
    assert store.put_tokens(np.array([1, 2, 3], dtype=np.int64)) == store.put_tokens([1, 2, 3])


def test_missing_objects_raise_with_their_kind(store):
    with pytest.raises(MissingObject, match="missing page"):
        store.get_page(b"\1" * 16)
    with pytest.raises(MissingObject, match="missing blob"):
        store.get_tokens(TokenRef("00" * 16, 1))


def test_pins_record_digests_once_and_drop(store):
    pages = [os.urandom(100) for _ in range(3)]
    r = store.put_pages(pages, pin="writer-1")
    store.put_pages(pages[:1], pin="writer-1")
    assert store.get_pin("writer-1") == r.digests
    store.pin_extend("writer-1", [b"\7" * 16])
    assert store.get_pin("writer-1") == [*r.digests, b"\7" * 16]
    info = store.list_pins()["writer-1"]
    assert info is not None and info.created <= info.updated and not info.stale()
    assert store.drop_pin("writer-1") is True
    assert store.get_pin("writer-1") == []
    with pytest.raises(InvalidName):
        store.pin_extend("", [])


def test_meta_records_are_json_and_format_key_is_reserved(store):
    store.meta_put("engine:abc", {"model": "m", "threads": 2})
    store.meta_put("engine:def", {"model": "n"})
    assert store.meta_get("engine:abc") == {"model": "m", "threads": 2}
    assert store.meta_get("nothing") is None
    assert set(store.meta_items("engine:")) == {"engine:abc", "engine:def"}
    with pytest.raises(InvalidName):
        store.meta_put("format", {})
    assert store.meta_delete("engine:def") is True
    assert store.meta_get("format")["format"] == "paged-batchinvariant-v1"  # readable, not writable


def test_format_record_is_written_and_checked(tmp_path):
    path = tmp_path / "s"
    with Store(path):
        pass
    env = lmdb.open(str(path), max_dbs=16)
    meta = env.open_db(b"meta", create=False)
    with env.begin() as txn:
        record = json.loads(txn.get(b"format", db=meta))
    assert record["format"] == "paged-batchinvariant-v1" and record["version"] == 1
    assert record["created"].endswith("Z")
    with env.begin(write=True) as txn:
        txn.put(b"format", json.dumps({**record, "version": 5}).encode(), db=meta)
    env.close()
    with pytest.raises(UnsupportedFormat, match="version 5"):
        Store(path)
    with pytest.raises(UnsupportedFormat):
        Store(path, readonly=True)


def test_foreign_lmdb_environment_is_refused(tmp_path):
    env = lmdb.open(str(tmp_path / "other"), max_dbs=4)
    env.open_db(b"something")
    env.close()
    with pytest.raises(UnsupportedFormat, match="no format record"):
        Store(tmp_path / "other")


def test_readonly_open_never_creates_and_never_writes(tmp_path):
    with pytest.raises(StoreNotFound, match="no store at"):
        Store(tmp_path / "missing", readonly=True)
    assert not (tmp_path / "missing" / "data.mdb").exists()
    with Store(tmp_path / "s") as rw:
        d = rw.put_pages([b"page"]).digests[0]
    with Store(tmp_path / "s", readonly=True) as ro:
        assert ro.get_page(d) == b"page"
        with pytest.raises(ReadOnlyStore):
            ro.put_pages([b"other"])


def test_two_stores_on_one_directory_share_the_environment(tmp_path):
    a = Store(tmp_path / "s")
    b = Store(tmp_path / "s", readonly=True)
    d = a.put_pages([b"shared"]).digests[0]
    assert b.get_page(d) == b"shared"
    a.close()
    assert b.get_page(d) == b"shared"  # still open: closing one does not close the other
    b.close()


def test_status_counts(store):
    store.put_pages([b"a" * 10, b"b" * 20])
    store.put_blob(b"blob")
    st_ = store.status()
    assert (st_.num_pages, st_.page_bytes, st_.num_blobs, st_.num_snapshots) == (2, 30, 1, 0)
    assert (st_.format, st_.version) == ("paged-batchinvariant-v1", 1)
    assert st_.head.ref is None and st_.head.cid is None
    assert 0 < st_.size_bytes <= st_.map_size


def test_a_forked_child_is_told_to_open_the_store_after_forking(tmp_path):
    store = Store(tmp_path / "s")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what opening the store does, then leave without cleanup
        try:
            Store(tmp_path / "s")
            message = "opened"
        except StoreError as exc:
            message = str(exc)
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert "opened before this process was forked" in message
    assert store.put_pages([b"parent still works"]).new == [True]
    store.close()
