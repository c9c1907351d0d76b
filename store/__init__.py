"""LMDB object store for paged KV snapshots (format ``paged-batchinvariant-v1``).

Pages and blobs are content-addressed (xxh3-128), snapshots are canonical JSON manifests named by
sha256 cids, refs and HEAD move by compare-and-swap with a reflog, and gc/fsck keep it tidy and
honest. docs/format.md specifies the bytes on disk.
"""

from processfork.store.diff import DiffResult
from processfork.store.digest import (
    canonical_json,
    cid_from_key,
    cid_key,
    digest_from_hex,
    digest_hex,
    is_cid,
    normalize_cid,
    page_digest,
)
from processfork.store.env import DB_NAMES, FORMAT_VERSION, default_store_path
from processfork.store.errors import (
    AmbiguousRevision,
    CorruptPage,
    InvalidAge,
    InvalidName,
    MissingObject,
    PageSizeMismatch,
    ReadOnlyStore,
    RefConflict,
    StoreError,
    StoreFull,
    StoreNotFound,
    UnknownRevision,
    UnsupportedFormat,
)
from processfork.store.fsck import FsckIssue
from processfork.store.gc import GcStats
from processfork.store.graph import LogEntry, graph_lines
from processfork.store.lmdb_store import Store
from processfork.store.manifest import (
    FORMAT,
    ForkInfo,
    InvalidManifest,
    Manifest,
    Sequence,
    TokenRef,
    utc_now,
)
from processfork.store.objects import PIN_STALE_SECONDS, PinInfo, PutResult
from processfork.store.refs import ANY, HEAD, HeadInfo, ReflogEntry, validate_ref_name
from processfork.store.status import StoreStatus
from processfork.store.timeparse import parse_age

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
    "InvalidManifest",
    "InvalidName",
    "LogEntry",
    "Manifest",
    "MissingObject",
    "PageSizeMismatch",
    "PinInfo",
    "PutResult",
    "ReadOnlyStore",
    "RefConflict",
    "ReflogEntry",
    "Sequence",
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
    "digest_hex",
    "graph_lines",
    "is_cid",
    "normalize_cid",
    "page_digest",
    "parse_age",
    "utc_now",
    "validate_ref_name",
]
