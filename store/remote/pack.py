"""Packs: many content-addressed objects in one immutable remote object, with an index.

A pack is the objects' bytes back to back. Its index (canonical JSON) lists, for each object,
its kind, its address, its offset and its length, so a reader fetches any object with one range
read. Every object is verified against its address when it is read (`verify`), so neither a
damaged pack nor a lying index can put a wrong byte into a store.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass

from processfork.store.digest import canonical_json, cid_of, page_digest

__all__ = ["KIND_BLOB", "KIND_PAGE", "KIND_SNAPSHOT", "PackBody", "PackEntry", "PackIndex",
           "pack_name", "verify"]

KIND_PAGE = "p"
KIND_BLOB = "b"
KIND_SNAPSHOT = "s"
_KIND_NAMES = {KIND_PAGE: "page", KIND_BLOB: "blob", KIND_SNAPSHOT: "snapshot"}
_KEY_LENGTHS = {KIND_PAGE: 32, KIND_BLOB: 32, KIND_SNAPSHOT: 64}
PACK_INDEX_FORMAT = "processfork-pack"


@dataclass(frozen=True)
class PackEntry:
    kind: str  # p, b or s
    key: str  # hex: xxh3-128 for pages and blobs, sha256 for snapshots
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class PackIndex:
    name: str  # pack_name(entries, size): sha256 hex of the object list
    size: int
    entries: tuple[PackEntry, ...]

    def encode(self) -> bytes:
        return canonical_json(
            {
                "format": PACK_INDEX_FORMAT,
                "version": 1,
                "pack": self.name,
                "size": self.size,
                "objects": _listing(self.entries),
            }
        )

    @classmethod
    def decode(cls, name: str, raw: bytes) -> PackIndex:
        """Parse an index; ValueError when it is not the index of pack `name`."""
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("format") != PACK_INDEX_FORMAT or d.get("version") != 1:
            raise ValueError("not a pack index of version 1")
        if d.get("pack") != name:
            raise ValueError(f"the index names pack {d.get('pack')!r}")
        size = d.get("size")
        if not isinstance(size, int) or size < 0:
            raise ValueError("no pack size")
        entries = []
        for item in d.get("objects", []):
            kind, key, offset, length = item
            if kind not in _KEY_LENGTHS or not isinstance(key, str) or len(key) != _KEY_LENGTHS[kind]:
                raise ValueError(f"bad entry {item!r}")
            if not (isinstance(offset, int) and isinstance(length, int)) or offset < 0 or length < 0:
                raise ValueError(f"bad entry {item!r}")
            if offset + length > size:
                raise ValueError(f"entry {key} runs past the pack's end")
            entries.append(PackEntry(kind, key, offset, length))
        return cls(name, size, tuple(entries))


class PackBody:
    """A pack's bytes, the objects back to back, as the file object an upload reads: no copy.

    boto3 takes a body as bytes or as a file object; a push hands it the objects where they
    lie in the store's memory map, so the pack is never assembled in memory. `http.client`
    reads a file body 16 KiB at a time, a Python call and a new bytes object for each; this
    file hands out views, each the rest of one object (cut at `max(size, min_read)`) whatever
    the size asked, so a 64 MiB pack of 384 KiB objects goes in 170 sends that each let go of
    the GIL. Seekable, so the client can hash the body and rewind it, and rewind it again for
    a retry.
    """

    def __init__(self, parts: Sequence[memoryview], *, min_read: int = 8 << 20) -> None:
        self._parts = [p if p.format == "B" and p.ndim == 1 else p.cast("B") for p in parts]
        self._starts = list(itertools.accumulate((len(p) for p in self._parts), initial=0))
        self._min_read = min_read
        self._pos = 0
        self._part = 0  # the part that holds byte `_pos` (len(parts) at the end)

    def __len__(self) -> int:
        return self._starts[-1]

    def read(self, size: int | None = -1) -> bytes | memoryview:
        """The next bytes: the rest of the current object, at most `max(size, min_read)`;
        everything left, joined, for size < 0; b"" at the end."""
        if size is None or size < 0:
            rest = [self._parts[self._part][self._pos - self._starts[self._part] :],
                    *self._parts[self._part + 1 :]] if self._part < len(self._parts) else []
            self.seek(0, 2)
            return b"".join(rest)
        while self._part < len(self._parts) and self._pos >= self._starts[self._part + 1]:
            self._part += 1
        if self._part == len(self._parts):
            return b""
        at = self._pos - self._starts[self._part]
        piece = self._parts[self._part][at : at + max(size, self._min_read)]
        self._pos += len(piece)
        return piece

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self)}[whence]
        self._pos = min(max(base + offset, 0), len(self))
        self._part = max(bisect.bisect_right(self._starts, self._pos) - 1, 0)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def pack_name(entries: Sequence[PackEntry], size: int) -> str:
    """A pack's name: the SHA-256 of its object list and size, in canonical JSON.

    Every object in a pack is addressed by the digest of its bytes and verified against it when
    read, so the list names the pack's bytes as far as those addresses do, and two writers that
    pack the same objects in the same order pick the same name for the same bytes. Hashing the
    list instead of the bytes spares a push a second pass over everything it uploads (SHA-256
    runs below 1 GB/s on one core). Packs of earlier writers, named by the SHA-256 of their
    bytes, read the same: readers never derive a name, they list them.
    """
    return hashlib.sha256(canonical_json({"objects": _listing(entries), "size": size})).hexdigest()


def _listing(entries: Sequence[PackEntry]) -> list[list[object]]:
    """The index's ``objects``: ``[kind, address, offset, length]`` per object, in pack order."""
    return [[e.kind, e.key, e.offset, e.length] for e in entries]


def address_of(kind: str, data: bytes | memoryview) -> str:
    """The address `data` has as an object of `kind`."""
    if kind == KIND_SNAPSHOT:
        return cid_of(bytes(data))[len("sha256:") :]
    return page_digest(data).hex()


def kind_name(kind: str) -> str:
    return _KIND_NAMES[kind]


def verify(kind: str, key: str, data: bytes | memoryview) -> str | None:
    """None when `data` is the object `key`, else the address its bytes have."""
    actual = address_of(kind, data)
    return None if actual == key else actual
