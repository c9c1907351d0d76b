"""Push: send a remote the snapshots its refs should name, and only the objects it lacks.

The order keeps the remote consistent if the push dies at any point: packs and their indexes
first (immutable, content-named: an interrupted upload leaves an unreferenced pack that
`gc_remote` reclaims), refs last, each moved by a conditional write that fails if another
writer moved it since it was read. A ref move that is not a fast-forward is refused unless forced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import as_completed, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lmdb
from processfork.store.digest import normalize_cid
from processfork.store.errors import CorruptPage, MissingObject
from processfork.store.remote import layout, local
from processfork.store.remote.errors import NonFastForward, RemoteError
from processfork.store.remote.layout import RefValue
from processfork.store.remote.objstore import ConditionFailed
from processfork.store.remote.pack import (
    KIND_BLOB,
    KIND_PAGE,
    KIND_SNAPSHOT,
    PackBody,
    PackEntry,
    PackIndex,
    kind_name,
    pack_name,
    verify,
)
from processfork.store.remote.prefix import PrefixRecord, local_record, needs_record
from processfork.store.remote.remote import Remote

if TYPE_CHECKING:
    from processfork.store.env import Env

__all__ = ["PACK_SIZE", "PushResult", "RefUpdate", "push"]

PACK_SIZE = 64 << 20  # bytes of objects per pack: one PUT each, several in flight
Progress = Callable[[str, int, int], None]


@dataclass
class RefUpdate:
    ref: str
    old: str | None
    new: str
    status: str  # created, fast-forward, forced, up-to-date


@dataclass
class PushResult:
    url: str
    refs: list[RefUpdate] = field(default_factory=list)
    objects: int = 0  # objects uploaded
    pages: int = 0
    blobs: int = 0
    snapshots: int = 0
    bytes: int = 0  # object bytes uploaded (pack bodies)
    packs: int = 0
    prefix_records: int = 0  # prefix records uploaded (store/remote/prefix.py)
    requests: int = 0  # every request the push made
    seconds: float = 0.0


def push(
    env: Env,
    remote: Remote,
    refs: Mapping[str, str],
    *,
    force: bool = False,
    pack_size: int = PACK_SIZE,
    progress: Progress | None = None,
) -> PushResult:
    """Make the remote's ref NAME name cid `refs[NAME]`, uploading what it lacks."""
    t0 = time.perf_counter()
    requests0 = remote.store.requests
    result = PushResult(str(remote.url))
    remote.check_format(create=True)
    wanted = {name: normalize_cid(cid) for name, cid in refs.items()}
    names = sorted(wanted)
    olds = _read_old_refs(remote, names)
    moves: list[tuple[RefUpdate, RefValue | None]] = []
    for name in names:
        update = _plan_ref(env, name, olds[name], wanted[name], force, str(remote.url))
        result.refs.append(update)
        if update.status != "up-to-date":
            moves.append((update, olds[name]))
    if moves:
        remote.load_indexes()
        objects, reused = _missing_objects(env, remote, [u.new for u, _ in moves])
        _upload(env, remote, objects, pack_size, result, progress)
        sent = ["sha256:" + key for kind, key in objects if kind == KIND_SNAPSHOT]
        result.prefix_records = _upload_prefix_records(env, remote, sent)
        _check_still_there(remote, reused)
        for update, old in moves:
            try:
                remote.write_ref(update.ref, update.new, old)
            except ConditionFailed:
                raise NonFastForward(
                    update.ref, f"it changed on remote {remote.url} during the push; "
                    "pull and push again"
                ) from None
    result.requests = remote.store.requests - requests0
    result.seconds = time.perf_counter() - t0
    return result


def _read_old_refs(remote: Remote, names: list[str]) -> dict[str, RefValue | None]:
    """Where the remote's refs `names` are: one listing tells which exist (a new ref, such as
    each child of a fork, costs no read), then one read per existing ref for its cid and ETag."""
    existing = set(remote.list_ref_names()) if len(names) > 1 else set(names)
    present = [n for n in names if n in existing]
    found = dict(zip(present, remote._map(remote.read_ref, present)))
    return {n: found.get(n) for n in names}


def _plan_ref(
    env: Env, name: str, old: RefValue | None, new: str, force: bool, url: str
) -> RefUpdate:
    if old is None:
        return RefUpdate(name, None, new, "created")
    if old.cid == new:
        return RefUpdate(name, old.cid, new, "up-to-date")
    if local.missing_snapshots(env, [old.cid]):
        if force:
            return RefUpdate(name, old.cid, new, "forced")
        raise NonFastForward(
            name, f"remote {url} has snapshots this store lacks (pull first, or push --force)"
        )
    if local.is_ancestor(env, old.cid, new):
        return RefUpdate(name, old.cid, new, "fast-forward")
    if force:
        return RefUpdate(name, old.cid, new, "forced")
    raise NonFastForward(
        name, f"not a fast-forward of {old.cid[7:19]} on remote {url} (pull first, or push --force)"
    )


def _missing_objects(
    env: Env, remote: Remote, cids: list[str]
) -> tuple[list[tuple[str, str]], set[str]]:
    """(kind, key hex) of every object the snapshots reach that the remote lacks: pages first,
    then blobs, then manifests parents first (a reader finds manifests at the end of a pack);
    and the remote packs that hold the objects it has."""
    reach = local.closure(env, cids)
    wanted = [(KIND_PAGE, k) for k in sorted(reach.pages)]
    wanted += [(KIND_BLOB, k) for k in sorted(reach.blobs)]
    wanted += [(KIND_SNAPSHOT, c[7:]) for c in reach.snapshots]
    missing, reused = [], set()
    for kind, key in wanted:
        where = remote.locate(kind, key)
        if where is None:
            missing.append((kind, key))
        else:
            reused.add(where.pack)
    return missing, reused


def _upload_prefix_records(env: Env, remote: Remote, snapshots: list[str]) -> int:
    """The prefix record of every snapshot this push uploaded, but fork children, whose
    parents' records serve them. Written after the packs, so a server that finds a record finds
    its snapshot; before the refs. How many were written."""
    records = [r for r in (local_record(env, c) for c in needs_record(env, snapshots)) if r]

    def put(record: PrefixRecord) -> None:
        try:
            remote.store.put(layout.prefix_path(record.cid), record.encode(), if_absent=True)
        except ConditionFailed:
            pass  # written already: a record never changes

    remote._map(put, records)
    return len(records)


def _check_still_there(remote: Remote, packs: set[str]) -> None:
    """Right before the refs move: every pack this push re-uses is still on the remote (a
    remote gc may have removed an unreferenced one since the push listed them)."""
    if not packs:
        return
    listed = {o.key for o in remote.store.list("packs")}
    gone = sorted(p for p in packs if layout.idx_path(p) not in listed)
    if gone:
        raise RemoteError(
            f"remote {remote.url}: pack {gone[0]} this push re-uses was removed meanwhile; "
            "push again (it uploads those objects)"
        )


_DB = {KIND_PAGE: "pages", KIND_BLOB: "blobs", KIND_SNAPSHOT: "snapshots"}


def _pack_ranges(env: Env, objects: list[tuple[str, str]], pack_size: int) -> list[range]:
    """Which objects go in which pack: about `pack_size` bytes each (a pack closes at the first
    object that reaches it), from the objects' sizes in one read transaction."""

    def plan(txn: lmdb.Transaction) -> list[range]:
        ranges, first, size = [], 0, 0
        for i, (kind, key) in enumerate(objects):
            view = txn.get(bytes.fromhex(key), db=env.dbs[_DB[kind]])
            if view is None:
                raise MissingObject(kind_name(kind), key)
            size += len(view)
            if size >= pack_size:
                ranges.append(range(first, i + 1))
                first, size = i + 1, 0
        if first < len(objects):
            ranges.append(range(first, len(objects)))
        return ranges

    return env.read(plan, buffers=True)


def _send_pack(env: Env, remote: Remote, objects: list[tuple[str, str]]) -> PackIndex:
    """Upload one pack of `objects` straight out of the store's memory map, and its index.

    Each object is verified where it lies (a damaged object is never spread), then the upload
    reads the same bytes, in the same read transaction, so LMDB cannot reuse their pages while
    they are sent. No pack is assembled in memory: copying 64 MiB into a new buffer (its memory
    faulted in first) held each upload back by about a tenth of the push on a 16-core host.
    """

    def send(txn: lmdb.Transaction) -> PackIndex:
        views: list[memoryview] = []
        entries, offset = [], 0
        for kind, key in objects:
            view = txn.get(bytes.fromhex(key), db=env.dbs[_DB[kind]])
            if view is None:
                raise MissingObject(kind_name(kind), key)
            actual = verify(kind, key, view)
            if actual is not None:
                raise CorruptPage(key, actual, kind_name(kind))
            views.append(view)
            entries.append(PackEntry(kind, key, offset, len(view)))
            offset += len(view)
        index = PackIndex(pack_name(entries, offset), offset, tuple(entries))
        remote.put_pack(PackBody(views), index)
        return index

    return env.read(send, buffers=True)


def _upload(
    env: Env,
    remote: Remote,
    objects: list[tuple[str, str]],
    pack_size: int,
    result: PushResult,
    progress: Progress | None,
) -> None:
    """Each pack verified and uploaded by one of the remote's threads, all packs at once, its
    objects read where they lie in the store."""
    if not objects:
        return
    pool = remote.store.pool()

    def send(part: range) -> PackIndex:
        return _send_pack(env, remote, objects[part.start : part.stop])

    pending = [pool.submit(send, part) for part in _pack_ranges(env, objects, pack_size)]
    done_objects = 0
    try:
        for future in as_completed(pending):
            index = future.result()
            result.packs += 1
            result.bytes += index.size
            for entry in index.entries:
                name = kind_name(entry.kind) + "s"
                setattr(result, name, getattr(result, name) + 1)
            result.objects += len(index.entries)
            done_objects += len(index.entries)
            if progress is not None:
                progress("objects", done_objects, len(objects))
    finally:
        for future in pending:
            future.cancel()
        wait(pending)
