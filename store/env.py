"""The LMDB environment under a store: opening, the format check, transactions that survive map growth.

LMDB allows one open of an environment per process (its locks belong to the process), so every
`Store` on the same directory in one process shares one `Env` here, counted by references.

Map growth: a write that hits `MapFullError` is aborted, the map doubled, and the whole transaction
function run again; a transaction that finds `MapResizedError` (another process grew the file) adopts
the new size and runs again. Changing the map size while any transaction of this process is open would
leave dangling pointers (and zero-copy buffers), so transactions hold a shared gate and a resize waits
for the gate alone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import lmdb
from processfork.store.digest import canonical_json
from processfork.store.errors import (
    ReadOnlyStore,
    StoreError,
    StoreFull,
    StoreNotFound,
    UnsupportedFormat,
)
from processfork.store.manifest import FORMAT, utc_now
from processfork.store.mapping import file_map_base
from processfork.store.prefix_index import INDEX_DB, INDEX_META_KEY, build_index

__all__ = [
    "DB_NAMES",
    "DEFAULT_MAP_SIZE",
    "FORMAT_VERSION",
    "Env",
    "acquire_env",
    "default_store_path",
]

T = TypeVar("T")

#: The newest version of the store's format record this code reads and writes. Version 2 adds
#: grouped manifests (several KV-cache groups per sequence) and sequences whose partial last block
#: has no page (session turns). A store is created as version 1 and becomes version 2 in the
#: transaction that writes its first such manifest, so a store of other snapshots stays readable
#: by releases that know version 1 only. Version 3 adds manifests whose groups hold a
#: per-sequence state (Mamba layers), likewise raised by the first such manifest. Version 4 adds
#: manifests whose pages hold one KV head each (any tensor-parallel size), likewise.
FORMAT_VERSION = 4
#: Versions of the format record this code reads.
READABLE_VERSIONS = (1, 2, 3, 4)
DB_NAMES = ("pages", "blobs", "snapshots", "refs", "reflog", "meta", "pins", "journal")
DEFAULT_MAP_SIZE = 1 << 30
MAX_MAP_SIZE = 1 << 44
MAX_DBS = 16
META_FORMAT_KEY = b"format"
# Owner-only: the store holds every agent's token ids and KV pages (restrict_modes says why).
STORE_DIR_MODE = 0o700
STORE_FILE_MODE = 0o600
_log = logging.getLogger("processfork.store")
_LOW_SPACE = 16 << 20  # an EIO at commit with less free space than this is a full disk


def default_store_path() -> str:
    """`$PF_STORE`, else `~/.processfork`."""
    env = os.environ.get("PF_STORE")
    return os.path.expanduser(env) if env else os.path.join(os.path.expanduser("~"), ".processfork")


class _Gate:
    """Shared while transactions run, exclusive while the map size changes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._resizing = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class _Retry(Exception):
    """Internal: the transaction must run again after `action` ("grow" or "adopt")."""

    def __init__(self, action: str) -> None:
        self.action = action


class Env:
    """One open LMDB environment with the store's named databases."""

    def __init__(self, path: str, *, map_size: int | None, create: bool) -> None:
        self.path = path
        self.refs = 0
        self.pid = os.getpid()
        self._write_lock = threading.RLock()
        self._gate = _Gate()
        self._map_generation = 0
        self._map_base: tuple[int, int | None] | None = None
        data_file = os.path.join(path, "data.mdb")
        exists = os.path.exists(data_file)
        if not exists and not create:
            raise StoreNotFound(path)
        try:
            os.makedirs(path, mode=STORE_DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise self._os_error(exc) from exc
        if exists:
            restrict_modes(path)
        size = os.path.getsize(data_file) if exists else 0
        self.writable = os.access(path, os.W_OK)
        kwargs: dict[str, Any] = {
            "map_size": max(map_size or DEFAULT_MAP_SIZE, size),
            "subdir": True,
            "readonly": not self.writable,
            # MDB_NOMETASYNC: a commit syncs its data pages, then writes its meta page without a
            # sync; `write` syncs that meta page before it returns unless its caller defers it
            # (durable=False). Never MDB_NOSYNC, which can corrupt the file in a system crash.
            "metasync": False,
            "sync": True,
            "writemap": False,  # a full disk must be an error at commit, not SIGBUS on a mapped write
            "max_dbs": MAX_DBS,
            "max_readers": 512,
            "max_spare_txns": 8,
            "lock": True,
            "mode": STORE_FILE_MODE,
        }
        try:
            self.env = _open_env(path, kwargs)
        except lmdb.Error as exc:
            raise self.translate(exc) from exc
        try:
            if self.writable:
                self.env.reader_check()  # free reader slots of killed processes
            self.dbs: dict[str, Any] = {}
            self._init_or_check(create)
        except BaseException:
            self.env.close()
            raise

    # -- opening --------------------------------------------------------------------------
    def _init_or_check(self, create: bool) -> None:
        def probe(txn: lmdb.Transaction) -> set[bytes]:
            return {bytes(k) for k, _ in txn.cursor()}

        names = self.read(probe)
        if b"meta" not in names:
            if names or not create or not self.writable:
                found = "no format record" if names else "empty store"
                if not names and not create:
                    raise StoreNotFound(self.path)
                raise UnsupportedFormat(found)
            self._initialize()
        self.dbs = {n: self.env.open_db(n.encode(), create=False) for n in ("meta",)}
        record = self.read(lambda t: t.get(META_FORMAT_KEY, db=self.dbs["meta"]))
        check_format_record(record)
        missing = [n for n in DB_NAMES if n.encode() not in self.read(probe)]
        if missing:
            raise UnsupportedFormat(f"{FORMAT} without databases {missing}")
        for name in DB_NAMES:
            self.dbs[name] = self.env.open_db(name.encode(), create=False)
        self._open_index(INDEX_DB.encode() in self.read(probe))

    def _open_index(self, exists: bool) -> None:
        """Open the prefix index; a writer builds it for a store made before it existed.

        The build runs in one write transaction that also records it in `meta`, so two processes
        opening the same older store build it once. A read-only open of such a store has no index
        (lookups find nothing)."""
        if exists:
            self.dbs[INDEX_DB] = self.env.open_db(INDEX_DB.encode(), create=False)
            return
        if not self.writable:
            return

        def build(txn: lmdb.Transaction) -> None:
            db = self.env.open_db(INDEX_DB.encode(), txn=txn, create=True)
            if txn.get(INDEX_META_KEY, db=self.dbs["meta"]) is not None:
                return
            dbs = {**self.dbs, INDEX_DB: db}
            entries = build_index(txn, dbs)
            record = {"built": utc_now(), "entries": entries}
            txn.put(INDEX_META_KEY, canonical_json(record), db=self.dbs["meta"])

        self.write(build)
        self.dbs[INDEX_DB] = self.env.open_db(INDEX_DB.encode(), create=False)

    def _initialize(self) -> None:
        def init(txn: lmdb.Transaction) -> None:
            for name in DB_NAMES:
                db = self.env.open_db(name.encode(), txn=txn, create=True)
                if name == "meta":
                    record = {"created": utc_now(), "format": FORMAT, "version": 1}
                    txn.put(META_FORMAT_KEY, canonical_json(record), overwrite=False, db=db)
            self.env.open_db(INDEX_DB.encode(), txn=txn, create=True)

        self.write(init)

    def info(self) -> dict[str, Any]:
        """LMDB's environment info: map_size, last_pgno, ... (its map_addr is 0: see below)"""
        return self.env.info()

    def data_map_base(self) -> int | None:
        """Where this process maps data.mdb (None: unknown); call it inside a transaction.

        LMDB's own ``map_addr`` is 0 unless the map is fixed, so the kernel's list of mappings
        is read, once per map: a resize (the only thing that moves the map) cannot run while a
        transaction holds the gate, and it starts a new generation.
        """
        cached = self._map_base
        if cached is None or cached[0] != self._map_generation:
            cached = (self._map_generation, file_map_base(os.path.join(self.path, "data.mdb")))
            self._map_base = cached
        return cached[1]

    def stat(self) -> dict[str, Any]:
        """LMDB's statistics of the main database: psize (the page size), depth, entries, ..."""
        return self.env.stat()

    # -- transactions ---------------------------------------------------------------------
    def read(self, fn: Callable[[lmdb.Transaction], T], *, buffers: bool = False) -> T:
        """Run `fn` in one read transaction; buffers=True hands out zero-copy memoryviews."""
        while True:
            try:
                with self._gate.shared():
                    try:
                        txn = self.env.begin(buffers=buffers)
                    except lmdb.MapResizedError:
                        raise _Retry("adopt") from None
                    try:
                        return fn(txn)
                    except lmdb.MapResizedError:
                        raise _Retry("adopt") from None
                    finally:
                        txn.abort()
            except _Retry as retry:
                self._resize(retry.action)
            except lmdb.Error as exc:
                raise self.translate(exc) from exc

    def write(self, fn: Callable[[lmdb.Transaction], T], *, durable: bool = True) -> T:
        """Run `fn` in one write transaction and commit; rerun it whole after map growth.

        `fn` must build all its results inside the call: a retry discards the first attempt.
        Values read in `fn` are zero-copy memoryviews, valid only inside it.

        The environment runs with MDB_NOMETASYNC: LMDB's commit makes the transaction's data
        pages durable, then writes the meta page that publishes them without waiting for it.
        A durable write (the default) then syncs the file, so it returns only once the commit
        is on disk, as with LMDB's default mode, at the same two syncs. `durable=False` skips
        that second sync, for bulk writes that nothing refers to yet (a fetch's pages, under
        its pin): other processes see the commit at once and a killed process loses nothing; a
        system crash can undo the last such commit (the next commit's first sync flushes its
        meta page), never damage an earlier one, since a meta page reaches the disk only after
        the pages it names. The caller's next durable write makes them durable too.
        """
        if not self.writable:
            raise ReadOnlyStore(self.path)
        with self._write_lock:
            while True:
                try:
                    with self._gate.shared():
                        try:
                            txn = self.env.begin(write=True, buffers=True)
                        except lmdb.MapResizedError:
                            raise _Retry("adopt") from None
                        try:
                            result = fn(txn)
                            txn.commit()
                            if durable:
                                self.env.sync(True)
                            return result
                        except lmdb.MapFullError:
                            raise _Retry("grow") from None
                        except lmdb.MapResizedError:
                            raise _Retry("adopt") from None
                        finally:
                            txn.abort()  # no-op after a successful commit
                except _Retry as retry:
                    self._resize(retry.action)
                except lmdb.Error as exc:
                    raise self.translate(exc) from exc

    def _resize(self, action: str) -> None:
        with self._gate.exclusive():
            self._map_generation += 1  # the map may move: data_map_base reads it again
            if action == "adopt":
                self.env.set_mapsize(0)
                return
            current = self.env.info()["map_size"]
            if current >= MAX_MAP_SIZE:
                raise StoreFull(self.path, f"map size limit {MAX_MAP_SIZE} bytes reached")
            self.env.set_mapsize(min(current * 2, MAX_MAP_SIZE))

    # -- errors ---------------------------------------------------------------------------
    def translate(self, exc: BaseException) -> StoreError | BaseException:
        """ENOSPC (which LMDB reports as EIO after a short write) becomes StoreFull."""
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        text = str(exc)
        if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text:
            return StoreFull(self.path, "no space left on device")
        if code == errno.EIO or "Input/output error" in text:
            free = self._free_bytes()
            if free is not None and free < _LOW_SPACE:
                return StoreFull(self.path, f"no space left on device ({free} bytes free)")
        if isinstance(exc, lmdb.Error):
            return StoreError(f"store {self.path}: {text}")
        return exc

    def _os_error(self, exc: OSError) -> BaseException:
        return self.translate(exc)

    def _free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return None
        blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
        return blocks * st.f_frsize

    def close(self) -> None:
        self.env.close()


def _open_env(path: str, kwargs: dict[str, Any]) -> lmdb.Environment:
    """Open with the LMDB 0.9 file format pinned where the binding can choose (format stability)."""
    try:
        return lmdb.open(path, lib_version=0, **kwargs)
    except TypeError:  # bindings before 3.0 have one engine and no lib_version
        return lmdb.open(path, **kwargs)


def restrict_modes(path: str) -> list[str]:
    """Make an existing store owner-only again, with a warning; return what was changed.

    The store holds every agent's token ids and KV pages, which reveal its prompts: no other local
    user may read them. Stores made before this rule (0755 / 0644 under the usual umask) are fixed
    when their owner opens them; files of another owner are left as they are.
    """
    changed = []
    for name in ("", "data.mdb", "lock.mdb"):
        target = os.path.join(path, name) if name else path
        try:
            st = os.stat(target)
            if st.st_uid != os.geteuid() or not stat.S_IMODE(st.st_mode) & 0o077:
                continue
            os.chmod(target, stat.S_IMODE(st.st_mode) & ~0o077)
        except OSError:
            continue
        changed.append(f"{name or 'the directory'} {stat.S_IMODE(st.st_mode):04o}")
    if changed:
        _log.warning(
            "store %s was readable by other users (%s); made it owner-only", path, ", ".join(changed)
        )
    return changed


def check_format_record(record: Any) -> dict[str, Any]:
    """Refuse any store whose meta `format` record this code does not understand."""
    if record is None:
        raise UnsupportedFormat("no format record")
    try:
        meta = json.loads(bytes(record))
    except (ValueError, UnicodeDecodeError):
        raise UnsupportedFormat("unreadable format record") from None
    if not isinstance(meta, dict):
        raise UnsupportedFormat("unreadable format record")
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise UnsupportedFormat(f"{meta.get('format')} version {meta.get('version')}")
    return meta


_REGISTRY: dict[str, Env] = {}
_REGISTRY_LOCK = threading.Lock()


def acquire_env(path: str, *, map_size: int | None = None, create: bool = True) -> Env:
    """The process-wide `Env` for `path`, opened on first use; pair with `release_env`."""
    key = os.path.realpath(path)
    with _REGISTRY_LOCK:
        env = _REGISTRY.get(key)
        if env is not None and env.pid != os.getpid():
            # Inherited through fork(): LMDB forbids using the parent's environment, and the binding
            # refuses a second open of the same files in this process image.
            raise StoreError(
                f"store {key} was opened before this process was forked; open it only after "
                "fork, or start workers with the 'spawn' method"
            )
        if env is None:
            env = Env(key, map_size=map_size, create=create)
            _REGISTRY[key] = env
        env.refs += 1
        return env


def release_env(env: Env) -> None:
    with _REGISTRY_LOCK:
        env.refs -= 1
        if env.refs <= 0:
            if _REGISTRY.get(env.path) is env:
                del _REGISTRY[env.path]
            env.close()
