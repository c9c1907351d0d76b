"""Content-addressed objects inside a transaction: pages, blobs, the journal of write times, pins.

The journal records when each object was last written or re-used, so gc's grace period protects a
writer that found a page already present (and skipped writing it) until its snapshot commits. Pins
name the objects of a writer still in progress, so even `gc --prune=now` keeps them.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import lmdb
from processfork.store.digest import page_digest
from processfork.store.errors import InvalidDigest, InvalidName, MissingObject
from processfork.store.owners import Liveness, Owner, current_owner, liveness

__all__ = [
    "JOURNAL_BLOB",
    "JOURNAL_PAGE",
    "JOURNAL_SNAPSHOT",
    "PIN_STALE_SECONDS",
    "PinInfo",
    "PutResult",
    "as_buffer",
    "decode_pin",
    "now_us",
    "validate_key_name",
]

JOURNAL_PAGE = b"p"
JOURNAL_BLOB = b"b"
JOURNAL_SNAPSHOT = b"s"
PIN_STALE_SECONDS = 24 * 3600.0
_U64 = struct.Struct("<Q")
_PIN_HEADER = struct.Struct("<QQ")  # created, updated (Unix microseconds)
# The top bit of `created` says that an owner record (owners.Owner, 40 bytes) follows the header.
# Pins written before owners were recorded have no such bit and no record.
_PIN_HAS_OWNER = 1 << 63
DIGEST_SIZE = 16


@dataclass
class PutResult:
    """What a page write did: one digest and one `new` flag per input page, and the bytes added."""

    digests: list[bytes]
    new: list[bool]
    bytes_written: int


@dataclass(frozen=True)
class PinInfo:
    """A writer's pin: what it protects and when it was created / last extended (Unix seconds)."""

    name: str
    digests: list[bytes]
    created: float
    updated: float
    owner: Owner | None = None
    """The process that created the pin; None for pins written before owners were recorded."""

    def stale(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) - self.updated > PIN_STALE_SECONDS

    def owner_dead(self) -> bool:
        """Its owner has certainly exited (owners.liveness): nothing will finish or drop it."""
        return liveness(self.owner) is Liveness.DEAD

    def abandoned(self, now: float | None = None) -> bool:
        """gc drops it: its owner is dead, or it has not been extended for a day."""
        return self.owner_dead() or self.stale(now)


def now_us() -> int:
    return int(time.time() * 1_000_000)


def validate_key_name(name: str, what: str = "name") -> str:
    """Pins and meta keys: non-empty UTF-8, at most 255 bytes, no control characters."""
    if not isinstance(name, str) or not name:
        raise InvalidName(str(name), f"empty {what}")
    if len(name.encode("utf-8")) > 255 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidName(name, f"a {what} is at most 255 bytes without control characters")
    return name


def as_buffer(page: Any) -> memoryview:
    """A flat byte view of a page without copying (a non-contiguous array is copied once)."""
    mv = page if isinstance(page, memoryview) else memoryview(page)
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def stamp(txn: lmdb.Transaction, dbs: dict[str, Any], kind: bytes, key: bytes, t_us: int) -> None:
    txn.put(kind + key, _U64.pack(t_us), db=dbs["journal"])


def journal_seconds(raw: Any) -> float:
    """A journal value as Unix seconds; a malformed one counts as infinitely old."""
    if raw is None or len(raw) != 8:
        return 0.0
    return _U64.unpack(raw)[0] / 1e6


def journal_time(txn: lmdb.Transaction, dbs: dict[str, Any], kind: bytes, key: bytes) -> float:
    """Seconds of the last write/re-use of an object; 0.0 (infinitely old) when unrecorded."""
    return journal_seconds(txn.get(kind + key, db=dbs["journal"]))


def put_pages(
    txn: lmdb.Transaction,
    dbs: dict[str, Any],
    items: Sequence[tuple[bytes, memoryview | None]],
    t_us: int,
) -> tuple[list[bool], int]:
    """Insert pages not yet present (one B-tree descent each, no copy of existing pages).

    An item whose page is None names a page the caller saw in the store already (it released
    the bytes): it must still be there, checked in this transaction, or MissingObject.
    """
    pages = dbs["pages"]
    put, present = txn.put, txn.cursor(db=pages).set_key
    new: list[bool] = []
    written = 0
    for digest, buf in items:
        if buf is None:
            if not present(digest):
                raise MissingObject("page", digest.hex())
            new.append(False)
        elif put(digest, buf, overwrite=False, db=pages):
            new.append(True)
            written += buf.nbytes
        else:
            new.append(False)
    # One call stamps them all: a put per page cost a warm snapshot of 4,096 pages about as
    # much as finding them.
    stamp_value = _U64.pack(t_us)
    txn.cursor(db=dbs["journal"]).putmulti([(JOURNAL_PAGE + d, stamp_value) for d, _ in items])
    return new, written


def put_pages_stream(
    txn: lmdb.Transaction,
    dbs: dict[str, Any],
    count: int,
    page: Callable[[int], Any],
    t_us: int,
) -> PutResult:
    """Hash and insert `page(0)`, `page(1)`, ... one at a time (LMDB copies each value at put, so
    the producer may reuse one buffer)."""
    digests: list[bytes] = []
    new: list[bool] = []
    written = 0
    for i in range(count):
        buf = as_buffer(page(i))
        digest = page_digest(buf)
        created, nbytes = put_pages(txn, dbs, [(digest, buf)], t_us)
        digests.append(digest)
        new += created
        written += nbytes
    return PutResult(digests, new, written)


def pages_size(txn: lmdb.Transaction, dbs: dict[str, Any], keys: Iterable[bytes]) -> int:
    """Stored bytes of these pages (missing ones count 0), without copying their contents."""
    db = dbs["pages"]
    total = 0
    for key in keys:
        value = txn.get(bytes(key), db=db)
        total += 0 if value is None else len(value)
    return total


def page_views_found(txn: lmdb.Transaction, dbs: dict[str, Any],
                     keys: Sequence[bytes]) -> list[Any]:
    """Zero-copy views of pages (a transaction opened with buffers=True); None for each absent
    one."""
    get = txn.cursor(db=dbs["pages"]).get
    return [get(key) for key in keys]


def page_views(txn: lmdb.Transaction, dbs: dict[str, Any], keys: Sequence[bytes]) -> list[Any]:
    """Zero-copy views of pages (a transaction opened with buffers=True); MissingObject if any
    is absent."""
    views = page_views_found(txn, dbs, keys)
    for key, view in zip(keys, views):
        if view is None:
            raise MissingObject("page", key.hex())
    return views


def put_blob(
    txn: lmdb.Transaction, dbs: dict[str, Any], digest: bytes, data: Any, t_us: int
) -> bool:
    created = txn.put(digest, data, overwrite=False, db=dbs["blobs"])
    stamp(txn, dbs, JOURNAL_BLOB, digest, t_us)
    return created


# -- pins ----------------------------------------------------------------------------------------
def decode_pin(name: str, raw: bytes) -> PinInfo:
    raw = bytes(raw)
    if len(raw) < _PIN_HEADER.size:
        raise ValueError(f"pin {name!r} has a malformed value of {len(raw)} bytes")
    created, updated = _PIN_HEADER.unpack_from(raw)
    owner: Owner | None = None
    start = _PIN_HEADER.size
    if created & _PIN_HAS_OWNER:
        created &= ~_PIN_HAS_OWNER
        if len(raw) < start + Owner.SIZE:
            raise ValueError(f"pin {name!r} has a malformed value of {len(raw)} bytes")
        owner = Owner.unpack(raw[start : start + Owner.SIZE])
        start += Owner.SIZE
    body = raw[start:]
    if len(body) % DIGEST_SIZE:
        raise ValueError(f"pin {name!r} has a malformed value of {len(raw)} bytes")
    digests = [body[i : i + DIGEST_SIZE] for i in range(0, len(body), DIGEST_SIZE)]
    return PinInfo(name, digests, created / 1e6, updated / 1e6, owner)


def _encode_pin(created_us: int, updated_us: int, owner: Owner | None, body: bytes) -> bytes:
    if owner is None:
        return _PIN_HEADER.pack(created_us, updated_us) + body
    return _PIN_HEADER.pack(created_us | _PIN_HAS_OWNER, updated_us) + owner.pack() + body


def pin_extend(
    txn: lmdb.Transaction, dbs: dict[str, Any], name: str, digests: Iterable[bytes], t_us: int
) -> None:
    """Add digests to pin `name` (created when absent, owned by this process) and refresh its
    time. Extending keeps the creator as the owner."""
    validate_key_name(name, "pin name")
    key = name.encode("utf-8")
    raw = txn.get(key, db=dbs["pins"])
    if raw is None:
        created, owner, old = t_us, current_owner(), []
    else:
        info = decode_pin(name, raw)
        created, owner = round(info.created * 1e6), info.owner
        old = info.digests
    added = [bytes(d) for d in digests]
    if any(len(d) != DIGEST_SIZE for d in added):
        raise InvalidDigest(next(d for d in added if len(d) != DIGEST_SIZE).hex())
    # dict.fromkeys keeps the first of each digest, in order, in one call: a warm snapshot
    # pins thousands of pages it found, many of them (empty blocks) the same.
    body = b"".join(dict.fromkeys([*old, *added]))
    txn.put(key, _encode_pin(created, t_us, owner, body), db=dbs["pins"])


def drop_pin(txn: lmdb.Transaction, dbs: dict[str, Any], name: str) -> bool:
    return bool(txn.delete(name.encode("utf-8"), db=dbs["pins"]))


def read_pins(txn: lmdb.Transaction, dbs: dict[str, Any]) -> dict[str, PinInfo | None]:
    """Every pin by name; None for a malformed record (fsck reports it, gc deletes it)."""
    out: dict[str, PinInfo | None] = {}
    for key, value in txn.cursor(db=dbs["pins"]):
        name = bytes(key).decode("utf-8", "replace")
        try:
            out[name] = decode_pin(name, value)
        except ValueError:
            out[name] = None
    return out
