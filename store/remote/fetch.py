"""Fetch and pull: bring a remote's snapshots into the local store, only the objects it lacks.

Every object is verified against its address as it arrives. Pages and blobs go in under one pin
(so a concurrent gc keeps them); then ONE write transaction writes the manifests, parents first,
moves the refs and drops the pin. A fetch that dies leaves no manifest and no ref, only pinned
objects of an exited writer, which the next `pf gc` reclaims. The objects' commits skip the sync
of their meta page (Env.write, durable=False); the manifests' durable commit makes them durable
with it, so no ref ever names an object a system crash could lose.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb
from processfork.store import objects as _objects
from processfork.store import refs as _refs
from processfork.store.digest import cid_key, normalize_cid
from processfork.store.errors import RefConflict
from processfork.store.manifest import (
    InvalidManifest,
    Manifest,
    decode_page_table,
    parse_head,
    stored_sequences,
)
from processfork.store.prefix_index import index_snapshot, inherit_partition
from processfork.store.remote import local
from processfork.store.remote.errors import NonFastForward, RemoteError, UnknownRemoteRef
from processfork.store.remote.pack import KIND_BLOB, KIND_PAGE, KIND_SNAPSHOT
from processfork.store.remote.prefix import read_records
from processfork.store.remote.remote import Remote
from processfork.store.snapshots import write_manifest

if TYPE_CHECKING:
    from processfork.store.env import Env

__all__ = ["FetchResult", "fetch", "tracking_ref", "update_refs"]

Progress = Callable[[str, int, int], None]
#: The least a commit of fetched pages waits for (unless the downloads end or wait for room):
#: each commit costs a sync of fixed latency, worth paying for a few MiB at least.
BATCH_MIN = 16 << 20


def tracking_ref(remote_name: str, ref: str) -> str:
    """The local ref that records where `ref` was on the remote: `remotes/<remote>/<ref>`."""
    return f"remotes/{remote_name}/{ref}"


@dataclass
class FetchResult:
    url: str
    refs: dict[str, str] = field(default_factory=dict)  # remote ref -> cid
    snapshots: int = 0  # manifests added to the local store
    blobs: int = 0
    pages: int = 0
    bytes: int = 0  # object bytes received
    requests: int = 0
    seconds: float = 0.0


def fetch(
    env: Env,
    remote: Remote,
    *,
    remote_name: str | None = None,
    names: Iterable[str] | None = None,
    cids: Iterable[str] = (),
    accept: Callable[[Mapping[str, dict[str, Any]]], None] | None = None,
    progress: Progress | None = None,
    roots: Mapping[str, bytes] | None = None,
    reason: str = "",
) -> FetchResult:
    """Bring in what the remote's refs (all, or `names`) reach; record them as tracking refs
    `remotes/<remote_name>/<ref>` when a name is given. With `cids`, bring in those snapshots
    (and their history) instead of any ref's, and record each one the store lacked in the
    FETCH_HEAD reflog, in the transaction that commits it (`reason` says what it was fetched
    for): no ref names it, and gc keeps it as long as that entry lives.

    `accept`, if given, sees every manifest to be fetched (cid -> stored form) before any page
    or blob moves, and may refuse them by raising. Each fetched snapshot goes into the local
    prefix index under the partition its remote prefix record names (`roots` gives those the
    caller has read already); one without a record is not indexed."""
    t0 = time.perf_counter()
    requests0 = remote.store.requests
    result = FetchResult(str(remote.url))
    cids = [normalize_cid(c) for c in cids]
    if not remote.check_format(create=False):
        if cids:
            raise RemoteError(f"remote {remote.url} is empty: it has no snapshot {cids[0]}")
        result.seconds = time.perf_counter() - t0
        return result  # an empty remote: nothing was ever pushed
    if cids:
        want = local.missing_snapshots(env, cids)
    else:
        remote_refs = remote.list_refs()
        if names is not None:
            chosen = list(dict.fromkeys(names))
            for name in chosen:
                if name not in remote_refs:
                    raise UnknownRemoteRef(str(remote.url), name)
            remote_refs = {n: remote_refs[n] for n in chosen}
        result.refs = {n: v.cid for n, v in sorted(remote_refs.items())}
        want = local.missing_snapshots(env, result.refs.values())
    manifests: dict[str, bytes] = {}
    if want:
        remote.load_indexes()
        manifests = _fetch_manifests(env, remote, want)
        if accept is not None:
            accept({cid: _json(cid, data) for cid, data in manifests.items()})
        pin = f"fetch:{uuid.uuid4().hex}"
        try:
            tables = _fetch_blobs(env, remote, manifests, pin, result)
            _fetch_pages(env, remote, tables, pin, result, progress)
            order = _parents_first(manifests)
            known = dict(roots or {})
            unknown = [c for c in order if c not in known]
            known.update((c, r.root) for c, r in read_records(
                remote, unknown, cache_dir=remote.index_cache).items())
            fetched = [c for c in cids if c in manifests]
            note = f"from {remote.url}" + (f" for {reason}" if reason else "")
            _commit(env, manifests, order, tables, remote_name, result.refs, pin, known,
                    fetched=fetched, note=note)
        except BaseException:
            env.write(lambda txn: _objects.drop_pin(txn, env.dbs, pin))
            raise
        result.snapshots = len(manifests)
    elif remote_name is not None:
        _commit(env, {}, [], {}, remote_name, result.refs, None)
    result.requests = remote.store.requests - requests0
    result.seconds = time.perf_counter() - t0
    return result


def _fetch_manifests(env: Env, remote: Remote, want: set[str]) -> dict[str, bytes]:
    """The stored bytes of every snapshot `want` reaches that the local store lacks. Each round
    reads the wanted manifests' packs' whole manifest sections (a push puts them together at
    the end of a pack), so a history pushed at once comes in one request."""
    found: dict[str, bytes] = {}
    extra: dict[str, bytes] = {}
    frontier = set(want)
    while frontier:
        batch: set[str] = set()
        for cid in frontier:
            if cid in extra:
                continue
            where = remote.locate(KIND_SNAPSHOT, cid[7:])
            if where is None:
                raise RemoteError(f"remote {remote.url} has no snapshot {cid}")
            index = remote._indexes[where.pack]
            batch.update(e.key for e in index.entries if e.kind == KIND_SNAPSHOT)
        batch = {k for k in batch if "sha256:" + k not in found and "sha256:" + k not in extra}
        missing = local.missing_snapshots(env, ["sha256:" + k for k in batch])
        for _, key, data in remote.read_objects((KIND_SNAPSHOT, c[7:]) for c in missing):
            extra["sha256:" + key] = data
        next_frontier: set[str] = set()
        for cid in frontier:
            data = extra.pop(cid)
            found[cid] = data
            for parent in parse_head(_json(cid, data))["parents"]:
                if parent not in found and parent not in next_frontier:
                    next_frontier.add(parent)
        frontier = local.missing_snapshots(env, next_frontier) - set(found)
    return found


def _json(cid: str, data: bytes) -> dict[str, Any]:
    try:
        d = json.loads(data)
    except ValueError:
        raise InvalidManifest(f"{cid} is not JSON") from None
    if not isinstance(d, dict):
        raise InvalidManifest(f"{cid} is not a JSON object")
    return d


def _fetch_blobs(
    env: Env, remote: Remote, manifests: Mapping[str, bytes], pin: str, result: FetchResult
) -> dict[str, bytes]:
    """Token arrays and page tables the manifests name and the store lacks; returns every page
    table (hex digest -> bytes), local or fetched."""
    tables: set[str] = set()
    blobs: set[str] = set()
    for cid, data in manifests.items():
        for s in stored_sequences(_json(cid, data)):
            blobs.add(s["tokens"]["digest"])
            blobs.add(s["pages"]["digest"])
            tables.add(s["pages"]["digest"])
    have = local.present(env, "blobs", blobs)
    fetched = {key: data for _, key, data in remote.read_objects((KIND_BLOB, k) for k in sorted(blobs - have))}
    if fetched:
        def run(txn: lmdb.Transaction) -> None:
            t = _objects.now_us()
            for key, data in fetched.items():
                _objects.put_blob(txn, env.dbs, bytes.fromhex(key), data, t)
            _objects.pin_extend(txn, env.dbs, pin, [bytes.fromhex(k) for k in fetched], t)

        env.write(run, durable=False)  # made durable by _commit, before anything names them
        result.blobs = len(fetched)
        result.bytes += sum(len(d) for d in fetched.values())
    out = {k: fetched[k] for k in tables if k in fetched}
    local_tables = sorted(tables - set(fetched))
    for key, data in zip(
        local_tables, local.read_raw(env, "blobs", [bytes.fromhex(k) for k in local_tables])
    ):
        out[key] = data
    return out


def _fetch_pages(
    env: Env,
    remote: Remote,
    tables: Mapping[str, bytes],
    pin: str,
    result: FetchResult,
    progress: Progress | None,
) -> None:
    pages: set[str] = set()
    for table in tables.values():
        for k, v in decode_page_table(table):
            pages.add(k)
            pages.add(v)
    want = sorted(pages - local.present(env, "pages", pages))

    def write(batch: list[tuple[bytes, bytes]]) -> None:
        items = [(digest, memoryview(data)) for digest, data in batch]

        def run(txn: lmdb.Transaction) -> None:
            t = _objects.now_us()
            _objects.put_pages(txn, env.dbs, items, t)
            _objects.pin_extend(txn, env.dbs, pin, [d for d, _ in items], t)

        env.write(run, durable=False)  # made durable by _commit, before anything names them

    # The store's commits overlap the downloads: each commits, in one transaction, the pages
    # that arrived during the one before (at least BATCH_MIN of them, unless the downloads
    # end or wait for room), with one sync; _commit's makes them all durable.
    for batch in remote.read_batches(
        ((KIND_PAGE, k) for k in want), min_bytes=BATCH_MIN, progress=progress
    ):
        write([(bytes.fromhex(key), data) for _, key, data in batch])
        result.pages += len(batch)
        result.bytes += sum(len(data) for _, _, data in batch)


def _parents_first(manifests: Mapping[str, bytes]) -> list[str]:
    order: list[str] = []
    done: set[str] = set()
    for start in sorted(manifests):
        stack = [(start, False)]
        while stack:
            cid, expanded = stack.pop()
            if expanded:
                if cid not in done:
                    done.add(cid)
                    order.append(cid)
                continue
            if cid in done:
                continue
            stack.append((cid, True))
            parents = parse_head(_json(cid, manifests[cid]))["parents"]
            stack.extend((p, False) for p in parents if p in manifests and p not in done)
    return order


def _commit(
    env: Env,
    manifests: Mapping[str, bytes],
    order: list[str],
    tables: Mapping[str, bytes],
    remote_name: str | None,
    refs: Mapping[str, str],
    pin: str | None,
    roots: Mapping[str, bytes] | None = None,
    *,
    fetched: Iterable[str] = (),
    note: str = "",
) -> None:
    """ONE transaction: the manifests (each checked against what it names) and their prefix
    index entries, the tracking refs, a FETCH_HEAD entry for each cid of `fetched`, the pin
    dropped. So no gc ever sees a fetched snapshot that nothing keeps."""
    parsed = []
    for cid in order:
        data = manifests[cid]
        manifest = Manifest.from_stored(_json(cid, data), tables)
        if manifest.canonical_bytes() != data:
            raise InvalidManifest(f"{cid} is not in canonical form")
        parsed.append((cid, data, manifest))

    def run(txn: lmdb.Transaction) -> None:
        t = _objects.now_us()
        for cid, data, manifest in parsed:
            write_manifest(
                txn, env.dbs, manifest, data, cid, manifest.page_tables(), manifest.page_keys(), t
            )
            root = (roots or {}).get(cid)
            if root is not None:
                index_snapshot(txn, env.dbs, cid, manifest, root=root)
            elif manifest.fork is not None and manifest.parents:
                inherit_partition(txn, env.dbs, cid, manifest.parents[0])
        if remote_name is not None:
            for name, cid in refs.items():
                ref = tracking_ref(remote_name, name)
                if _refs.read_ref(txn, env.dbs, ref) != cid:
                    _refs.set_ref(txn, env.dbs, ref, cid, action="update",
                                  message=f"fetch {remote_name}", now=t / 1e6)
        for cid in fetched:
            _refs.append_reflog(txn, env.dbs, _refs.FETCH_HEAD, None, cid, "fetch", note, t / 1e6)
        if pin is not None:
            _objects.drop_pin(txn, env.dbs, pin)

    env.write(run)


@dataclass
class RefMove:
    ref: str
    old: str | None
    new: str
    status: str  # created, fast-forward, up-to-date, diverged


def update_refs(
    env: Env, refs: Mapping[str, str], *, message: str, force: bool = False
) -> list[RefMove]:
    """Move local refs to the fetched cids where that is a fast-forward (or creates the ref):
    ONE transaction, each move a compare-and-swap. Diverged refs are left alone and reported
    (with `force`, moved)."""
    moves: list[RefMove] = []
    current = env.read(lambda txn: {n: _refs.read_ref(txn, env.dbs, n) for n in refs})
    for name, cid in sorted(refs.items()):
        old = current[name]
        if old is None:
            moves.append(RefMove(name, None, cid, "created"))
        elif old == cid:
            moves.append(RefMove(name, old, cid, "up-to-date"))
        elif local.is_ancestor(env, old, cid):
            moves.append(RefMove(name, old, cid, "fast-forward"))
        else:
            moves.append(RefMove(name, old, cid, "forced" if force else "diverged"))

    def run(txn: lmdb.Transaction) -> None:
        now = time.time()
        for move in moves:
            if move.status in ("created", "fast-forward", "forced"):
                if txn.get(cid_key(move.new), db=env.dbs["snapshots"]) is None:
                    raise RemoteError(f"snapshot {move.new} of ref {move.ref!r} was not fetched")
                _refs.set_ref(txn, env.dbs, move.ref, move.new, expected_old=move.old,
                              action="update", message=message, now=now)

    try:
        env.write(run)
    except RefConflict as exc:
        raise NonFastForward(exc.name, "it moved locally during the pull; pull again") from None
    return moves
