"""LMDB object store for paged KV snapshots (format ``paged-batchinvariant-v1``).

Pages and blobs are content-addressed (xxh3-128), snapshots are canonical JSON manifests named by
sha256 cids, refs and HEAD move by compare-and-swap with a reflog, and gc/fsck keep it tidy and
honest. docs/format.md specifies the bytes on disk.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Exports load on first use (PEP 562): `pf --help` and `pf log` should not pay for numpy and
# every store module just to start. Type checkers read the imports below.
if TYPE_CHECKING:
    from processfork.store.diff import (
        DiffResult,
    )
    from processfork.store.digest import (
        canonical_json,
        cid_from_key,
        cid_key,
        digest_from_hex,
        is_cid,
        normalize_cid,
        page_digest,
    )
    from processfork.store.env import (
        DB_NAMES,
        FORMAT_VERSION,
        default_store_path,
    )
    from processfork.store.errors import (
        AmbiguousRevision,
        CorruptPage,
        InvalidAge,
        InvalidArgument,
        InvalidCount,
        InvalidDigest,
        InvalidName,
        MalformedObject,
        MissingObject,
        PageSizeMismatch,
        ReadOnlyStore,
        RefConflict,
        RefIsHead,
        StoreError,
        StoreFull,
        StoreNotFound,
        UnknownRevision,
        UnsupportedFormat,
    )
    from processfork.store.fsck import (
        FsckIssue,
    )
    from processfork.store.gc import (
        GcStats,
    )
    from processfork.store.graph import (
        LogEntry,
        graph_lines,
    )
    from processfork.store.lmdb_store import (
        Store,
    )
    from processfork.store.manifest import (
        FORMAT,
        ForkInfo,
        InvalidManifest,
        Manifest,
        SnapshotSequence,
        TokenRef,
        utc_now,
    )
    from processfork.store.objects import (
        PIN_STALE_SECONDS,
        PinInfo,
        PutResult,
    )
    from processfork.store.refs import (
        ANY,
        HEAD,
        HeadInfo,
        ReflogEntry,
        validate_ref_name,
    )
    from processfork.store.status import (
        StoreStatus,
    )
    from processfork.store.timeparse import (
        parse_age,
    )

_EXPORTS: dict[str, str] = {
    "ANY": "processfork.store.refs",
    "DB_NAMES": "processfork.store.env",
    "FORMAT": "processfork.store.manifest",
    "FORMAT_VERSION": "processfork.store.env",
    "HEAD": "processfork.store.refs",
    "PIN_STALE_SECONDS": "processfork.store.objects",
    "AmbiguousRevision": "processfork.store.errors",
    "CorruptPage": "processfork.store.errors",
    "DiffResult": "processfork.store.diff",
    "ForkInfo": "processfork.store.manifest",
    "FsckIssue": "processfork.store.fsck",
    "GcStats": "processfork.store.gc",
    "HeadInfo": "processfork.store.refs",
    "InvalidAge": "processfork.store.errors",
    "InvalidArgument": "processfork.store.errors",
    "InvalidCount": "processfork.store.errors",
    "InvalidDigest": "processfork.store.errors",
    "MalformedObject": "processfork.store.errors",
    "InvalidManifest": "processfork.store.manifest",
    "InvalidName": "processfork.store.errors",
    "LogEntry": "processfork.store.graph",
    "Manifest": "processfork.store.manifest",
    "MissingObject": "processfork.store.errors",
    "PageSizeMismatch": "processfork.store.errors",
    "PinInfo": "processfork.store.objects",
    "PutResult": "processfork.store.objects",
    "ReadOnlyStore": "processfork.store.errors",
    "RefConflict": "processfork.store.errors",
    "RefIsHead": "processfork.store.errors",
    "ReflogEntry": "processfork.store.refs",
    "SnapshotSequence": "processfork.store.manifest",
    "Store": "processfork.store.lmdb_store",
    "StoreError": "processfork.store.errors",
    "StoreFull": "processfork.store.errors",
    "StoreNotFound": "processfork.store.errors",
    "StoreStatus": "processfork.store.status",
    "TokenRef": "processfork.store.manifest",
    "UnknownRevision": "processfork.store.errors",
    "UnsupportedFormat": "processfork.store.errors",
    "canonical_json": "processfork.store.digest",
    "cid_from_key": "processfork.store.digest",
    "cid_key": "processfork.store.digest",
    "default_store_path": "processfork.store.env",
    "digest_from_hex": "processfork.store.digest",
    "graph_lines": "processfork.store.graph",
    "is_cid": "processfork.store.digest",
    "normalize_cid": "processfork.store.digest",
    "page_digest": "processfork.store.digest",
    "parse_age": "processfork.store.timeparse",
    "utc_now": "processfork.store.manifest",
    "validate_ref_name": "processfork.store.refs",
}



def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

__all__ = [
    "ANY",
    "DB_NAMES",
    "FORMAT",
    "FORMAT_VERSION",
    "HEAD",
    "PIN_STALE_SECONDS",
    "AmbiguousRevision",
    "CorruptPage",
    "DiffResult",
    "ForkInfo",
    "FsckIssue",
    "GcStats",
    "HeadInfo",
    "InvalidAge",
    "InvalidArgument",
    "InvalidCount",
    "InvalidDigest",
    "InvalidManifest",
    "InvalidName",
    "LogEntry",
    "MalformedObject",
    "Manifest",
    "MissingObject",
    "PageSizeMismatch",
    "PinInfo",
    "PutResult",
    "ReadOnlyStore",
    "RefConflict",
    "RefIsHead",
    "ReflogEntry",
    "SnapshotSequence",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreNotFound",
    "StoreStatus",
    "TokenRef",
    "UnknownRevision",
    "UnsupportedFormat",
    "canonical_json",
    "cid_from_key",
    "cid_key",
    "default_store_path",
    "digest_from_hex",
    "graph_lines",
    "is_cid",
    "normalize_cid",
    "page_digest",
    "parse_age",
    "utc_now",
    "validate_ref_name",
]
