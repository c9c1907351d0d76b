"""`Store`: the LMDB object store of one directory (format `paged-batchinvariant-v1`).

Safe to open from several processes at once (API server, engine worker, CLI, gc): LMDB serializes
writers and gives every reader a consistent snapshot. Each public call is one transaction, so what it
changes becomes visible all at once or not at all. docs/format.md specifies the bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import lmdb
from processfork.store import meta as _meta
from processfork.store import objects as _objects
from processfork.store import prefix_index as _prefix
from processfork.store import refs as _refs
from processfork.store.digest import (
    cid_from_key,
    cid_key,
    cid_of,
    normalize_cid,
    page_digest,
)
from processfork.store.env import Env, acquire_env, default_store_path, release_env
from processfork.store.errors import (
    CorruptPage,
    InvalidDigest,
    InvalidName,
    MalformedObject,
    MissingObject,
    PageSizeMismatch,
    ReadOnlyStore,
    RefIsHead,
    UnknownRevision,
)
from processfork.store.manifest import Manifest, TokenRef
from processfork.store.objects import (
    PinInfo,
    PutResult,
    as_buffer,
    now_us,
    validate_key_name,
)
from processfork.store.refs import ANY, HeadInfo, ReflogEntry
from processfork.store.revparse import resolve_in
from processfork.store.snapshots import load_manifest, write_manifest

if TYPE_CHECKING:
    # The history, maintenance, damage and diff helpers load on first use: `pf log` and
    # `pf refs` start faster without gc, fsck and diff in memory.
    from processfork.store.damage import SnapshotDamage
    from processfork.store.diff import DiffResult
    from processfork.store.fsck import FsckIssue
    from processfork.store.gc import GcStats
    from processfork.store.graph import LogEntry
    from processfork.store.status import StoreStatus

__all__ = ["Store"]

T = TypeVar("T")
MetaAfter = Callable[[PutResult], Mapping[str, dict[str, Any]]]


class Store:
    """One store directory. `Store()` opens `$PF_STORE` or `~/.processfork`, creating it if needed.

    `readonly=True` never creates or writes (StoreNotFound if there is no store). `map_size` is the
    initial LMDB map size; it grows by doubling whenever a write needs more.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        readonly: bool = False,
        map_size: int | None = None,
        create: bool | None = None,
    ) -> None:
        raw = default_store_path() if path is None else os.fspath(path)
        self.readonly = readonly
        self._env: Env | None = acquire_env(
            os.path.expanduser(raw),
            map_size=map_size,
            create=(not readonly) if create is None else create,
        )
        self.path = self._env.path

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def env(self) -> Env:
        if self._env is None:
            raise ValueError("store is closed")
        return self._env

    @property
    def dbs(self) -> dict[str, Any]:
        return self.env.dbs

    def close(self) -> None:
        if self._env is not None:
            env, self._env = self._env, None
            release_env(env)

    def __enter__(self) -> Store:  # noqa: PYI034 (final class)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.path!r}{', readonly=True' if self.readonly else ''})"

    def _read(self, fn: Callable[[lmdb.Transaction], Any], *, buffers: bool = False) -> Any:
        return self.env.read(fn, buffers=buffers)

    def _write(self, fn: Callable[[lmdb.Transaction], Any], *, durable: bool = True) -> Any:
        return self._writable_env().write(fn, durable=durable)

    def _writable_env(self) -> Env:
        """The environment, for helpers that write (gc, fork, repair); refused when this Store
        was opened read-only, even if the process's shared environment could write."""
        if self.readonly:
            raise ReadOnlyStore(self.path)
        return self.env

    # -- pages -------------------------------------------------------------------------------
    def put_pages(
        self, pages: Sequence[Any], *, pin: str | None = None, meta: MetaAfter | None = None
    ) -> PutResult:
        """Hash and store pages in ONE write transaction; pages already present are not copied.

        `meta`, if given, maps the result to small meta records written in the same transaction
        (a writer's progress record commits with its pages, at the cost of one durable commit).
        """
        bufs = [as_buffer(p) for p in pages]
        items = [(page_digest(b), b) for b in bufs]  # hashed before the writer lock is taken
        return self._put_hashed(items, pin, meta)

    def put_pages_hashed(
        self, items: Sequence[tuple[bytes, Any]], *, pin: str | None = None,
        meta: MetaAfter | None = None, durable: bool = True,
    ) -> PutResult:
        """Like put_pages for callers that already know each page's xxh3-128 digest.

        A page given as None must be in the store already (the caller checked, and let go of
        its bytes): it is pinned and journaled like the others, or MissingObject if it went.
        `durable=False`: the commit skips its second sync (`Env.write`), for a writer whose
        pages and records a durable commit that follows will name (a snapshot's).
        """
        return self._put_hashed(_hashed_items(items), pin, meta, durable)

    def put_page_groups(
        self, groups: Sequence[tuple[str | None, Sequence[tuple[bytes, Any]], MetaAfter | None]]
    ) -> list[PutResult]:
        """Several writers' hashed pages, each group with its own pin and meta records, in ONE
        write transaction: one durable commit for all of them, all or nothing.

        A group is ``(pin, items, meta)`` as `put_pages_hashed` takes them. A background writer
        that queued the pages of several jobs pays one disk flush for the lot.
        """
        checked = []
        for pin, items, meta in groups:
            if pin is not None:
                validate_key_name(pin, "pin name")
            checked.append((pin, _hashed_items(items), meta))

        def run(txn: lmdb.Transaction) -> list[PutResult]:
            t = now_us()
            results = []
            for pin, pages, meta in checked:
                new, written = _objects.put_pages(txn, self.dbs, pages, t)
                result = PutResult([d for d, _ in pages], new, written)
                self._after_put(txn, result, pin, meta, t)
                results.append(result)
            return results

        return self._write(run)

    def put_pages_from(
        self,
        count: int,
        page: Callable[[int], Any],
        *,
        pin: str | None = None,
        meta: MetaAfter | None = None,
        durable: bool = True,
    ) -> PutResult:
        """Like put_pages for pages produced one at a time, all in ONE write transaction.

        `page(i)` returns the i-th page; it is hashed and inserted before `page(i + 1)` is asked
        for, so the caller may build every page in the same small buffer (no staging copy of the
        whole batch). `page` must be deterministic: a transaction that has to grow the map runs
        again from `page(0)`.
        """
        if pin is not None:
            validate_key_name(pin, "pin name")

        def run(txn: lmdb.Transaction) -> PutResult:
            t = now_us()
            result = _objects.put_pages_stream(txn, self.dbs, count, page, t)
            self._after_put(txn, result, pin, meta, t)
            return result

        return self._write(run, durable=durable)

    def _after_put(
        self, txn: lmdb.Transaction, result: PutResult, pin: str | None,
        meta: MetaAfter | None, t: int,
    ) -> None:
        """The pin and the meta records that commit with a put's pages."""
        if pin is not None:
            _objects.pin_extend(txn, self.dbs, pin, result.digests, t)
        if meta is not None:
            for key, value in meta(result).items():
                _meta.meta_put(txn, self.dbs, key, value)

    def _put_hashed(
        self, items: list[tuple[bytes, memoryview]], pin: str | None, meta: MetaAfter | None,
        durable: bool = True,
    ) -> PutResult:
        if pin is not None:
            validate_key_name(pin, "pin name")

        def run(txn: lmdb.Transaction) -> PutResult:
            t = now_us()
            new, written = _objects.put_pages(txn, self.dbs, items, t)
            result = PutResult([d for d, _ in items], new, written)
            self._after_put(txn, result, pin, meta, t)
            return result

        return self._write(run, durable=durable)

    def has_pages(self, digests: Sequence[bytes]) -> list[bool]:
        def run(txn: lmdb.Transaction) -> list[bool]:
            cur = txn.cursor(db=self.dbs["pages"])
            return [bool(cur.set_key(bytes(d))) for d in digests]

        return self._read(run, buffers=True)

    def get_page(self, digest: bytes, *, verify: bool = True) -> bytes:
        return self._get_verified("pages", "page", bytes(digest), verify)

    def pages_size(self, digests: Sequence[bytes]) -> int:
        """Stored bytes of the given pages (missing ones count 0), without reading their contents."""
        return self._read(lambda txn: _objects.pages_size(txn, self.dbs, digests), buffers=True)

    def read_pages_into(
        self, digests: Sequence[bytes], out: Any, page_size: int, *, verify: bool = True
    ) -> None:
        """Copy pages straight from the memory map into `out[i*page_size:(i+1)*page_size]`.

        One read transaction, zero-copy source buffers, one memcpy per page; with `verify` the copy
        in `out` is re-hashed, which catches corruption at rest and in flight alike.
        """
        import numpy as np  # lazily: numpy costs `pf` a tenth of a second to start
        dst = (
            as_buffer(out)
            if not isinstance(out, np.ndarray)
            else memoryview(out.reshape(-1).view(np.uint8))
        )
        if dst.readonly:
            raise ValueError("read_pages_into needs a writable buffer")
        if len(dst) < len(digests) * page_size:
            raise ValueError(
                f"buffer of {len(dst)} bytes cannot hold {len(digests)} pages of {page_size}"
            )
        keys = digests if all(type(d) is bytes for d in digests) else [bytes(d) for d in digests]

        def run(txn: lmdb.Transaction) -> None:
            get = txn.cursor(db=self.dbs["pages"]).get  # a bound cursor: the cheapest lookup
            lo = 0
            for key in keys:
                src = get(key)
                if src is None:
                    raise MissingObject("page", key.hex())
                if len(src) != page_size:
                    raise PageSizeMismatch(key.hex(), page_size, len(src))
                hi = lo + page_size
                dst[lo:hi] = src
                if verify:
                    actual = page_digest(dst[lo:hi])
                    if actual != key:
                        raise CorruptPage(key.hex(), actual.hex())
                lo = hi

        self._read(run, buffers=True)

    def with_page_views(self, digests: Sequence[bytes], fn: Callable[[list[memoryview]], T]) -> T:
        """Run `fn` on zero-copy views of the pages, all inside one read transaction.

        For callers that copy pages somewhere other than one flat buffer (an engine's KV blocks,
        layer by layer): no intermediate copy. The views are valid only while `fn` runs. A
        missing page raises MissingObject before `fn` is called; nothing is verified here, so
        hash with `page_digest` whatever must be checked.
        """
        keys = [bytes(d) for d in digests]
        return self._read(lambda txn: fn(_objects.page_views(txn, self.dbs, keys)), buffers=True)

    def with_page_locations(
        self, digests: Sequence[bytes], fn: Callable[[list[memoryview], int | None, str], T]
    ) -> T:
        """Like `with_page_views`, and also where the views lie in the store's data file.

        `fn(views, map_base, data_file)`: a view's byte `i` is byte `address(view) - map_base + i`
        of `data_file`, so a reader can `pread` a page straight into its own buffer (from the
        page cache, with no page faults on this process's map) instead of copying out of the map.
        `map_base` is None where the map cannot be located (no ``/proc``): copy from the views.
        """
        keys = [bytes(d) for d in digests]
        data_file = os.path.join(self.path, "data.mdb")

        def run(txn: lmdb.Transaction) -> T:
            views = _objects.page_views(txn, self.dbs, keys)
            return fn(views, self.env.data_map_base(), data_file)

        return self._read(run, buffers=True)

    def with_page_lookup(
        self,
        fn: Callable[[Callable[[Sequence[bytes]], list[memoryview | None]], int | None, str], T],
    ) -> T:
        """Like `with_page_locations`, for a caller that looks pages up a batch at a time while
        it works on those found already (a load copies the first pages while it looks up the
        rest): `fn(lookup, map_base, data_file)`, where `lookup(digests)` gives each page's
        zero-copy view, or None where the store lacks it. The views are valid until fn returns.
        """
        data_file = os.path.join(self.path, "data.mdb")

        def run(txn: lmdb.Transaction) -> T:
            def lookup(digests: Sequence[bytes]) -> list[memoryview | None]:
                return _objects.page_views_found(txn, self.dbs, [bytes(d) for d in digests])

            return fn(lookup, self.env.data_map_base(), data_file)

        return self._read(run, buffers=True)

    def _get_verified(self, db: str, kind: str, key: bytes, verify: bool) -> bytes:
        data = self._read(lambda txn: txn.get(key, db=self.dbs[db]))
        if data is None:
            raise MissingObject(kind, key.hex())
        if verify:
            actual = page_digest(data)
            if actual != key:
                raise CorruptPage(key.hex(), actual.hex(), kind)
        return data

    # -- blobs and tokens --------------------------------------------------------------------
    def put_blob(self, data: Any, *, pin: str | None = None) -> bytes:
        buf = as_buffer(data)
        digest = page_digest(buf)
        if pin is not None:
            validate_key_name(pin, "pin name")

        def run(txn: lmdb.Transaction) -> bytes:
            t = now_us()
            _objects.put_blob(txn, self.dbs, digest, buf, t)
            if pin is not None:
                _objects.pin_extend(txn, self.dbs, pin, [digest], t)
            return digest

        return self._write(run)

    def get_blob(self, digest: bytes, *, verify: bool = True) -> bytes:
        return self._get_verified("blobs", "blob", bytes(digest), verify)

    def has_blob(self, digest: bytes) -> bool:
        return self._read(lambda t: bool(t.cursor(db=self.dbs["blobs"]).set_key(bytes(digest))))

    def put_tokens(self, tokens: Any, *, pin: str | None = None) -> TokenRef:
        """Store token ids as int32 little-endian; out-of-range ids are refused, never wrapped."""
        import numpy as np  # lazily: numpy costs `pf` a tenth of a second to start
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError("tokens must be a flat sequence of integers")
        if arr.size and (arr.dtype.kind not in "iu" or arr.min() < -(2**31) or arr.max() >= 2**31):
            raise ValueError("token ids must be integers that fit in int32")
        data = np.ascontiguousarray(arr, dtype="<i4")
        digest = self.put_blob(data, pin=pin)
        return TokenRef(digest.hex(), int(data.size))

    def get_tokens(self, ref: TokenRef | str) -> list[int]:
        import numpy as np  # lazily: numpy costs `pf` a tenth of a second to start
        return np.frombuffer(self.get_token_bytes(ref), dtype="<i4").tolist()

    def get_token_bytes(self, ref: TokenRef | str) -> bytes:
        """The token ids as stored (int32 little-endian), for a caller that hashes or slices
        them: a 128K-token list costs milliseconds to build and again to encode."""
        digest_hex = ref.digest if isinstance(ref, TokenRef) else str(ref)
        data = self.get_blob(bytes.fromhex(digest_hex))
        if len(data) % 4:
            raise MalformedObject(digest_hex, f"{len(data)} bytes of token ids, not a multiple of 4")
        return data

    # -- pins --------------------------------------------------------------------------------
    def pin_extend(self, pin: str, digests: Sequence[bytes]) -> None:
        """Protect objects (pages, blobs) of a writer in progress from gc until `drop_pin`."""
        validate_key_name(pin, "pin name")
        self._write(lambda txn: _objects.pin_extend(txn, self.dbs, pin, list(digests), now_us()))

    def get_pin(self, pin: str) -> list[bytes]:
        raw = self._read(lambda txn: txn.get(pin.encode("utf-8"), db=self.dbs["pins"]))
        return [] if raw is None else _objects.decode_pin(pin, raw).digests

    def drop_pin(self, pin: str) -> bool:
        return self._write(lambda txn: _objects.drop_pin(txn, self.dbs, pin))

    def list_pins(self) -> dict[str, PinInfo | None]:
        return self._read(lambda txn: _objects.read_pins(txn, self.dbs))

    # -- snapshots -------------------------------------------------------------------------------
    def write_snapshot(
        self,
        manifest: Manifest,
        *,
        ref: str | None = None,
        expected_old: Any = ANY,
        move_head: bool = True,
        message: str = "",
        drop_pins: Sequence[str] = (),
        drop_meta: Sequence[str] = (),
        cache_salt: str | None = None,
    ) -> str:
        """Commit a snapshot in ONE transaction: check its objects exist, store it, index its
        blocks (under `cache_salt`'s partition: store/prefix_index.py), move the refs.

        `drop_pins` and `drop_meta` name the writers' pins and progress records that the commit
        makes obsolete; they go in the same transaction.

        With `ref`, the ref moves (compare-and-swap against `expected_old`) and, with `move_head`,
        HEAD becomes a symbolic ref to it; without `ref`, `move_head` detaches HEAD at the new cid.
        """
        manifest.validate()
        if ref is not None:
            _refs.validate_ref_name(ref)
        data = manifest.canonical_bytes()
        cid = cid_of(data)
        tables = manifest.page_tables()
        page_keys = manifest.page_keys()

        def run(txn: lmdb.Transaction) -> str:
            now = time.time()
            write_manifest(txn, self.dbs, manifest, data, cid, tables, page_keys, int(now * 1e6))
            _prefix.index_snapshot(txn, self.dbs, cid, manifest, cache_salt=cache_salt)
            self._move_refs(txn, cid, ref, expected_old, move_head, "snapshot", message, now)
            for pin in drop_pins:
                _objects.drop_pin(txn, self.dbs, pin)
            for key in drop_meta:
                _meta.meta_delete(txn, self.dbs, key)
            return cid

        return self._write(run)

    def write_replacement(
        self,
        manifest: Manifest,
        *,
        replaces: str,
        message: str = "",
        drop_pins: Sequence[str] = (),
        drop_meta: Sequence[str] = (),
    ) -> tuple[str, list[str]]:
        """Commit `manifest` as the replacement of snapshot `replaces` (a repaired copy) and move
        every ref that points at `replaces`, and HEAD when it is detached there, onto it: ONE
        transaction, each move a compare-and-swap with its reflog entry (action "repair").

        Returns the new cid and the names moved ("HEAD" for a detached HEAD)."""
        manifest.validate()
        old = normalize_cid(replaces)
        data = manifest.canonical_bytes()
        cid = cid_of(data)
        tables = manifest.page_tables()
        page_keys = manifest.page_keys()

        def run(txn: lmdb.Transaction) -> tuple[str, list[str]]:
            now = time.time()
            write_manifest(txn, self.dbs, manifest, data, cid, tables, page_keys, int(now * 1e6))
            _prefix.index_snapshot(txn, self.dbs, cid, manifest)
            moved = []
            for name, value in sorted(_refs.list_refs(txn, self.dbs).items()):
                if value == old:
                    _refs.set_ref(txn, self.dbs, name, cid, expected_old=old, action="repair",
                                  message=message, now=now)
                    moved.append(name)
            head = _refs.read_head(txn, self.dbs)
            if head.ref is None and head.cid == old:
                _refs.set_head(txn, self.dbs, cid=cid, action="repair", message=message, now=now)
                moved.append(_refs.HEAD)
            # The damaged snapshot stays for its reflog entries until they expire; fsck skips
            # the pages it lacks (repair cleared them), since nothing should use it any more.
            _meta.meta_put(txn, self.dbs, _meta.replaced_key(cid_key(old)),
                           {"by": cid, "time": now})
            for pin in drop_pins:
                _objects.drop_pin(txn, self.dbs, pin)
            for key in drop_meta:
                _meta.meta_delete(txn, self.dbs, key)
            return cid, moved

        return self._write(run)

    # -- damage --------------------------------------------------------------------------------
    def find_damage(self, cid: str) -> SnapshotDamage:
        """Hash every object snapshot `cid` names: what is missing or damaged (store/damage.py)."""
        from processfork.store.damage import find_damage

        return find_damage(self.env, normalize_cid(cid))

    def clear_damaged_pages(self, digests: Sequence[str]) -> list[str]:
        """Delete the damaged records among these pages, so a recomputation can store them."""
        from processfork.store.damage import clear_damaged_pages

        return clear_damaged_pages(self._writable_env(), digests)

    def _move_refs(
        self,
        txn: lmdb.Transaction,
        cid: str,
        ref: str | None,
        expected_old: Any,
        move_head: bool,
        action: str,
        message: str,
        now: float,
    ) -> None:
        if ref is not None:
            _refs.set_ref(
                txn,
                self.dbs,
                ref,
                cid,
                expected_old=expected_old,
                action=action,
                message=message,
                now=now,
            )
        if move_head:
            head = _refs.read_head(txn, self.dbs)
            if ref is not None and head.ref != ref:
                _refs.set_head(txn, self.dbs, ref=ref, action=action, message=message, now=now)
            elif ref is None:
                _refs.set_head(txn, self.dbs, cid=cid, action=action, message=message, now=now)

    def longest_prefix(
        self, root: bytes, tokens: Any, block_size: int, *, first: int, limit: int
    ) -> _prefix.PrefixHit | None:
        """The longest whole-block prefix of `tokens` that a stored snapshot holds, looked up
        from block `first` to block `limit - 1` in partition `root` (store/prefix_index.py)."""
        return self._read(
            lambda txn: _prefix.longest_prefix(
                txn, self.dbs, root, tokens, block_size, first=first, limit=limit
            ),
            buffers=True,
        )

    def commit_turn(self, turn: Any) -> Any:
        """Commit one session turn (a `sessions.SessionTurn`) in one transaction: its snapshot,
        index entries and ref move; returns a `sessions.TurnResult`."""
        from processfork.store.sessions import commit_turn

        return commit_turn(self._writable_env(), turn)

    def record_session_prefix(self, prefix: str) -> None:
        """Record that a server commits session turns under `prefix` (for `pf gc --session-ttl`)."""
        from processfork.store.sessions import record_session_prefix

        record_session_prefix(self._writable_env(), prefix)

    def session_prefixes(self) -> list[str]:
        """The session ref prefixes servers recorded; the default `sessions/` when none did."""
        from processfork.store.sessions import session_prefixes

        return self._read(lambda txn: session_prefixes(txn, self.dbs))

    def get_snapshot(self, cid: str) -> Manifest:
        full = normalize_cid(cid)
        return self._read(lambda txn: load_manifest(txn, self.dbs, full), buffers=True)

    def has_snapshot(self, cid: str) -> bool:
        try:
            key = cid_key(cid)
        except InvalidName:
            return False
        return self._read(
            lambda t: bool(t.cursor(db=self.dbs["snapshots"]).set_key(key)), buffers=True
        )

    def iter_snapshots(self) -> Iterator[tuple[str, Manifest]]:
        """Every snapshot, in cid order, read in one transaction (then yielded)."""

        def run(txn: lmdb.Transaction) -> list[tuple[str, Manifest]]:
            keys = list(txn.cursor(db=self.dbs["snapshots"]).iternext(values=False))
            return [(cid_from_key(k), load_manifest(txn, self.dbs, cid_from_key(k))) for k in keys]

        yield from self._read(run, buffers=True)

    def resolve(self, rev: str) -> str:
        return self._read(lambda txn: resolve_in(txn, self.dbs, rev), buffers=True)

    # -- refs ------------------------------------------------------------------------------------
    def set_ref(
        self,
        name: str,
        cid: str,
        *,
        expected_old: Any = ANY,
        message: str = "",
        action: str = "update",
    ) -> None:
        """CAS-move ref `name` to an existing snapshot; its reflog entry commits with it."""
        full = normalize_cid(cid)

        def run(txn: lmdb.Transaction) -> None:
            if txn.get(cid_key(full), db=self.dbs["snapshots"]) is None:
                raise MissingObject("snapshot", full)
            _refs.set_ref(
                txn, self.dbs, name, full, expected_old=expected_old, action=action, message=message
            )

        self._write(run)

    def delete_ref(
        self, name: str, *, expected_old: Any = ANY, message: str = "", allow_head: bool = True
    ) -> str:
        """Delete ref `name` (its reflog stays, ending with a `delete` entry); return the cid it
        held. UnknownRevision if there is no such ref; with `allow_head=False`, RefIsHead if
        HEAD points to it. Both are checked in the deleting transaction."""

        def run(txn: lmdb.Transaction) -> str:
            old = _refs.read_ref(txn, self.dbs, name)
            if old is None:
                raise UnknownRevision(name)
            if not allow_head and _refs.read_head(txn, self.dbs).ref == name:
                raise RefIsHead(name)
            _refs.set_ref(
                txn,
                self.dbs,
                name,
                None,
                expected_old=expected_old,
                action="delete",
                message=message,
            )
            return old

        _refs.validate_ref_name(name)
        return self._write(run)

    def get_ref(self, name: str) -> str | None:
        if name == _refs.HEAD:
            return self.head().cid
        return self._read(lambda txn: _refs.read_ref(txn, self.dbs, name))

    def list_refs(self) -> dict[str, str]:
        return self._read(lambda txn: _refs.list_refs(txn, self.dbs))

    def head(self) -> HeadInfo:
        return self._read(lambda txn: _refs.read_head(txn, self.dbs))

    def checkout_head(self, cid_or_ref: str, *, message: str = "") -> HeadInfo:
        """Make HEAD symbolic to an existing ref name, else detach it at the resolved revision."""

        def run(txn: lmdb.Transaction) -> HeadInfo:
            if cid_or_ref != _refs.HEAD and _refs.read_ref(txn, self.dbs, cid_or_ref) is not None:
                return _refs.set_head(txn, self.dbs, ref=cid_or_ref, message=message)
            cid = resolve_in(txn, self.dbs, cid_or_ref)
            return _refs.set_head(txn, self.dbs, cid=cid, message=message)

        return self._write(run)

    def reflog(self, name: str) -> list[ReflogEntry]:
        """Entries of ref `name` (or HEAD), oldest first."""
        return self._read(lambda txn: _refs.read_reflog(txn, self.dbs, name))

    # -- meta ------------------------------------------------------------------------------------
    def meta_get(self, key: str) -> dict[str, Any] | None:
        return self._read(lambda txn: _meta.meta_get(txn, self.dbs, key))

    def meta_put(self, key: str, value: dict[str, Any], *, durable: bool = True) -> None:
        """Small JSON records (e.g. `engine:<id>` fingerprints); the `format` key is reserved."""
        _meta.check_meta_key(key)
        self._write(lambda txn: _meta.meta_put(txn, self.dbs, key, value), durable=durable)

    def meta_delete(self, key: str) -> bool:
        _meta.check_meta_key(key)
        return self._write(lambda txn: _meta.meta_delete(txn, self.dbs, key))

    def meta_items(self, prefix: str = "") -> dict[str, dict[str, Any]]:
        return self._read(lambda txn: _meta.meta_items(txn, self.dbs, prefix))

    # -- high level (each in its own module) -----------------------------------------------------
    def fork(self, rev: str, n: int, *, prefix: str | None = None, message: str = "") -> list[str]:
        """n children of `rev` sharing all its pages, refs `{prefix}/0..n-1`; one transaction."""
        from processfork.store.fork import fork

        return fork(self._writable_env(), rev, n, prefix=prefix, message=message)

    def fork_named(
        self, rev: str, n: int, *, prefix: str | None = None, message: str = ""
    ) -> list[tuple[str, str]]:
        """Like `fork`, returning each child's (ref name, cid)."""
        from processfork.store.fork import fork_named

        return fork_named(self._writable_env(), rev, n, prefix=prefix, message=message)

    def log(
        self, rev: str | None = "HEAD", *, limit: int | None = None, all_refs: bool = False
    ) -> list[LogEntry]:
        from processfork.store.graph import log

        return log(self.env, rev, limit=limit, all_refs=all_refs)

    @staticmethod
    def graph_lines(entries: Sequence[LogEntry]) -> list[tuple[str, LogEntry | None]]:
        from processfork.store.graph import graph_lines

        return graph_lines(entries)

    def diff(self, a: str, b: str) -> DiffResult:
        from processfork.store.diff import diff

        return diff(self.env, a, b)

    def gc(
        self,
        *,
        dry_run: bool = False,
        prune: float | str = 600.0,
        expire: float | str = 30 * 86400.0,
        progress: Callable[[str, int, int], None] | None = None,
        session_ttl: float | str | None = None,
        session_prefixes: Sequence[str] | None = None,
    ) -> GcStats:
        from processfork.store.gc import gc

        env = self.env if dry_run else self._writable_env()
        return gc(env, dry_run=dry_run, prune=prune, expire=expire, progress=progress,
                  session_ttl=session_ttl, session_prefixes=session_prefixes)

    def fsck(
        self, *, progress: Callable[[str, int, int], None] | None = None
    ) -> Iterator[FsckIssue]:
        from processfork.store.fsck import fsck

        return fsck(self.env, progress=progress)

    def status(self) -> StoreStatus:
        from processfork.store.status import compute_status

        return compute_status(self.env)


def _hashed_items(items: Sequence[tuple[bytes, Any]]) -> list[tuple[bytes, memoryview | None]]:
    """A writer's ``(digest, page)`` items with each digest checked (16 bytes) and each page as
    a buffer (None: a page the store holds already). A comprehension each, not a loop with a
    check per item: a warm snapshot hands over thousands of pages it found."""
    digests = [bytes(digest) for digest, _ in items]
    if any(len(digest) != 16 for digest in digests):
        raise InvalidDigest(next(d for d in digests if len(d) != 16).hex())
    return [(digest, None if page is None else as_buffer(page))
            for digest, (_, page) in zip(digests, items)]
