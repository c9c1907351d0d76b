"""`Remote`: one remote's format record, pack indexes, refs and objects, over an ObjectStore.

Reads verify every object against its address before handing it out. Pack indexes are immutable,
so they are cached on local disk (`index_cache`) and fetched once per machine and pack.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import wait
from dataclasses import dataclass

from processfork.store.errors import InvalidName
from processfork.store.refs import validate_ref_name
from processfork.store.remote import layout
from processfork.store.remote.errors import (
    CorruptRemoteObject,
    RemoteError,
    RemoteFormatUnsupported,
    RemoteUnreachable,
)
from processfork.store.remote.feed import Feed, FeedClosed
from processfork.store.remote.objstore import ConditionFailed, ObjectStore
from processfork.store.remote.pack import PackBody, PackEntry, PackIndex, kind_name, verify
from processfork.store.remote.url import RemoteUrl

__all__ = ["Located", "Remote"]

#: Range reads of one pack merge objects closer than this; a read covers about
#: 1/parallelism of what a call wants, at least RANGE_MIN.
RANGE_GAP = 1 << 20
RANGE_MIN = 8 << 20
#: Verified objects that wait for the caller, at most (the range reads pause meanwhile).
FEED_BYTES = 64 << 20
#: Tries of one range read whose connection breaks midway.
STREAM_ATTEMPTS = 3
_RANGE_DONE = object()
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Located:
    pack: str
    entry: PackEntry


class Remote:
    def __init__(
        self, store: ObjectStore, *, index_cache: str | None = None
    ) -> None:
        self.store = store
        self.url: RemoteUrl = store.url
        self.index_cache = index_cache
        self._indexes: dict[str, PackIndex] = {}
        self._where: dict[tuple[str, str], Located] = {}

    # -- format --------------------------------------------------------------------------------
    def check_format(self, *, create: bool) -> bool:
        """Refuse a remote whose format record this implementation does not understand; with
        `create`, write the record into an empty remote (once: If-None-Match). False when the
        remote has no record and none was created."""
        got = self.store.get(layout.FORMAT_PATH)
        if got is None:
            if not create:
                return False
            try:
                self.store.put(layout.FORMAT_PATH, layout.format_record(), if_absent=True)
            except ConditionFailed:
                got = self.store.get(layout.FORMAT_PATH)  # a concurrent first push made it
            if got is None:
                return True
        problem = layout.understood(got.data)
        if problem is not None:
            raise RemoteFormatUnsupported(str(self.url), problem)
        return True

    # -- refs ----------------------------------------------------------------------------------
    def list_ref_names(self) -> list[str]:
        """The remote's ref names; a key under refs/ that is no valid ref name is not a ref."""
        names = []
        for listed in self.store.list("refs"):
            name = listed.key[len("refs/") :]
            try:
                validate_ref_name(name)
            except InvalidName:
                continue
            names.append(name)
        return names

    def list_refs(self) -> dict[str, layout.RefValue]:
        out: dict[str, layout.RefValue] = {}
        names = self.list_ref_names()
        for name, value in zip(names, self._map(self.read_ref, names)):
            if value is not None:
                out[name] = value
        return out

    def read_ref(self, name: str) -> layout.RefValue | None:
        got = self.store.get(layout.ref_path(name))
        if got is None:
            return None
        cid = layout.decode_ref(got.data)
        if cid is None:
            raise RemoteError(f"remote {self.url}: ref {name!r} holds no cid")
        return layout.RefValue(cid, got.etag)

    def write_ref(self, name: str, cid: str, old: layout.RefValue | None) -> None:
        """Compare-and-swap `name` to `cid` from `old` (None: only if it does not exist)."""
        if old is None:
            self.store.put(layout.ref_path(name), layout.encode_ref(cid), if_absent=True)
        else:
            self.store.put(layout.ref_path(name), layout.encode_ref(cid), if_match=old.etag)

    # -- indexes -------------------------------------------------------------------------------
    def load_indexes(self) -> dict[str, PackIndex]:
        """Every pack index on the remote (a pack without an index is not there yet)."""
        names = [n for n in (layout.pack_name_of(o.key) for o in self.store.list("packs")) if n]
        missing = [n for n in names if n not in self._indexes]
        for name, index in zip(missing, self._map(self._load_index, missing)):
            if index is not None:
                self._add_index(index)
        return {n: self._indexes[n] for n in names if n in self._indexes}

    def _add_index(self, index: PackIndex) -> None:
        self._indexes[index.name] = index
        for entry in index.entries:
            self._where.setdefault((entry.kind, entry.key), Located(index.name, entry))

    def has(self, kind: str, key: str) -> bool:
        return (kind, key) in self._where

    def locate(self, kind: str, key: str) -> Located | None:
        return self._where.get((kind, key))

    def _load_index(self, name: str) -> PackIndex | None:
        cached = self._cached_index(name)
        if cached is not None:
            return cached
        got = self.store.get(layout.idx_path(name))
        if got is None:
            return None  # deleted since the listing (remote gc)
        try:
            index = PackIndex.decode(name, got.data)
        except (ValueError, TypeError) as exc:
            raise RemoteError(f"remote {self.url}: pack index {name} is unreadable: {exc}") from None
        self._cache_index(name, got.data)
        return index

    def _cached_index(self, name: str) -> PackIndex | None:
        if self.index_cache is None:
            return None
        try:
            with open(os.path.join(self.index_cache, name + ".idx"), "rb") as f:
                return PackIndex.decode(name, f.read())
        except (OSError, ValueError, TypeError):
            return None

    def _cache_index(self, name: str, raw: bytes) -> None:
        if self.index_cache is None:
            return
        try:
            os.makedirs(self.index_cache, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.index_cache, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.replace(tmp, os.path.join(self.index_cache, name + ".idx"))
        except OSError:
            pass  # a cache that cannot be written costs one more GET next time, nothing else

    # -- objects -------------------------------------------------------------------------------
    def read_objects(
        self,
        wanted: Iterable[tuple[str, str]],
        *,
        progress: Progress | None = None,
    ) -> Iterator[tuple[str, str, bytes]]:
        """Yield `(kind, key, bytes)` for each wanted object, verified, in no particular order
        (read_batches, one at a time)."""
        for batch in self.read_batches(wanted, progress=progress):
            yield from batch

    def read_batches(
        self,
        wanted: Iterable[tuple[str, str]],
        *,
        max_bytes: int = FEED_BYTES,
        min_bytes: int = 0,
        progress: Progress | None = None,
    ) -> Iterator[list[tuple[str, str, bytes]]]:
        """Yield the wanted objects as `(kind, key, bytes)`, verified, in batches: each batch is
        what arrived while the caller handled the previous one (at least one object, at most
        `max_bytes` unless one object is bigger). A caller that commits each batch to a store
        thus commits bigger batches, with fewer syncs, exactly when its writes fall behind.
        With `min_bytes`, a batch also waits until that much has arrived (or a range read
        ends, or the reads wait for room), so no sync is spent on a trickle.

        Objects of one pack that lie close together come in one range read, streamed: each
        object is handed over as soon as its bytes arrive, while the range reads (several in
        parallel) go on, at most FEED_BYTES ahead of the caller. A wanted object the remote
        lacks is a RemoteError; one whose bytes do not hash to its key is CorruptRemoteObject.
        """
        by_pack: dict[str, list[PackEntry]] = {}
        total = 0
        for kind, key in dict.fromkeys(wanted):
            where = self._where.get((kind, key))
            if where is None:
                raise RemoteError(f"remote {self.url} has no {kind_name(kind)} {key}")
            by_pack.setdefault(where.pack, []).append(where.entry)
            total += where.entry.length
        if not by_pack:
            return
        ranges = plan_ranges(by_pack, total, self.store.parallelism)
        feed = Feed(FEED_BYTES)
        pool = self.store.pool()
        futures = [pool.submit(self._stream_range, pack, group, feed) for pack, group in ranges]
        try:
            left, done = len(ranges), 0
            while left:
                batch = []
                for item in feed.get_many(max_bytes, min_bytes):
                    if item is _RANGE_DONE:
                        left -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        batch.append(item)
                        done += len(item[2])
                if batch:
                    if progress is not None:
                        progress("bytes", done, total)
                    yield batch
        finally:
            feed.close()
            for future in futures:
                future.cancel()
            wait(futures)

    def _stream_range(self, pack: str, group: list[PackEntry], feed: Feed) -> None:
        """One range read into `feed`, each object verified; a connection that breaks midway is
        opened again from the first object not yet read (STREAM_ATTEMPTS in all)."""
        try:
            todo = deque(group)
            for attempt in range(STREAM_ATTEMPTS):
                try:
                    self._read_group(pack, todo, feed)
                    break
                except _Broken as broken:
                    if attempt + 1 == STREAM_ATTEMPTS:
                        raise broken.error from None
            feed.put_last(_RANGE_DONE)
        except FeedClosed:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            feed.put_last(exc)

    def _read_group(self, pack: str, todo: deque[PackEntry], feed: Feed) -> None:
        """Read `todo` (sorted by offset) from one stream; each entry read is removed from it."""
        start, end = todo[0].offset, max(e.end for e in todo)
        stream = self.store.open(layout.pack_path(pack), (start, end))
        if stream is None:
            raise RemoteError(f"remote {self.url}: pack {pack} is missing")
        try:
            pos = start
            while todo:
                entry = todo[0]
                if entry.offset > pos:
                    try:
                        stream.read(entry.offset - pos)  # a gap of objects not wanted
                    except RemoteUnreachable as exc:
                        raise _Broken(exc) from None
                try:
                    data = stream.read(entry.length)
                except RemoteUnreachable as exc:
                    raise _Broken(exc) from None
                actual = verify(entry.kind, entry.key, data)
                if actual is not None:
                    raise CorruptRemoteObject(str(self.url), entry.key, actual, kind_name(entry.kind))
                feed.put((entry.kind, entry.key, data), len(data))
                pos = entry.end
                todo.popleft()
        finally:
            stream.close()

    def put_pack(self, body: bytes | PackBody, index: PackIndex) -> None:
        """Upload a pack, then its index: a reader sees the pack only once both are there.
        Both are immutable and content-named, so one that exists already is the same bytes."""
        encoded = index.encode()
        for path, data in ((layout.pack_path(index.name), body), (layout.idx_path(index.name), encoded)):
            try:
                self.store.put(path, data, if_absent=True)
            except ConditionFailed:
                pass  # the same content is there already
        self._cache_index(index.name, encoded)
        self._add_index(index)

    def _map(self, fn: Callable, items: list) -> list:  # type: ignore[type-arg]
        if len(items) <= 1:
            return [fn(i) for i in items]
        return list(self.store.pool().map(fn, items))


class _Broken(Exception):
    """A range read's connection broke after the remote answered: worth opening again."""

    def __init__(self, error: RemoteUnreachable) -> None:
        super().__init__(str(error))
        self.error = error


def plan_ranges(
    by_pack: dict[str, list[PackEntry]], total: int, parallelism: int
) -> list[tuple[str, list[PackEntry]]]:
    """The range reads that bring the entries: per pack, runs of entries sorted by offset whose
    gaps are at most RANGE_GAP, each cut into pieces of about `total / parallelism` bytes (at
    least RANGE_MIN), so that every connection has work and no request is smaller than it must
    be. A push's 64 MiB packs come whole when there are enough of them."""
    target = max(RANGE_MIN, total // max(1, parallelism))
    out = []
    for pack, entries in by_pack.items():
        for run in _runs(entries):
            size = run[-1].end - run[0].offset
            pieces = max(1, min(len(run), int(size / target + 0.5)))
            step = size / pieces
            group: list[PackEntry] = []
            cut = 1
            for entry in run:
                if group and entry.offset - run[0].offset >= cut * step:
                    out.append((pack, group))
                    group = []
                    while entry.offset - run[0].offset >= cut * step:
                        cut += 1
                group.append(entry)
            out.append((pack, group))
    return out


def _runs(entries: list[PackEntry]) -> Iterator[list[PackEntry]]:
    """Entries sorted by offset, cut where the gap to the next exceeds RANGE_GAP."""
    run: list[PackEntry] = []
    for entry in sorted(entries, key=lambda e: e.offset):
        if run and entry.offset - run[-1].end > RANGE_GAP:
            yield run
            run = []
        run.append(entry)
    if run:
        yield run
