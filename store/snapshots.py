"""Storing and loading manifests inside a transaction, with the checks that keep history whole.

A manifest is written only after every object it names is found in the same write transaction, so
no reader, and no crash, can ever see a snapshot that points to a missing page.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import lmdb
from processfork.store.digest import cid_key, cid_of
from processfork.store.errors import CorruptPage, MissingObject
from processfork.store.manifest import InvalidManifest, Manifest, stored_sequences
from processfork.store.objects import JOURNAL_SNAPSHOT, put_blob, stamp

__all__ = ["load_manifest", "load_stored", "require_version", "write_manifest"]


def write_manifest(
    txn: lmdb.Transaction,
    dbs: dict[str, Any],
    manifest: Manifest,
    data: bytes,
    cid: str,
    tables: Mapping[str, bytes],
    page_keys: set[bytes],
    t_us: int,
    *,
    check_pages: bool = True,
) -> bool:
    """Check parents, pages and token blobs; store page tables and the manifest. True if new."""
    snapshots, blobs = dbs["snapshots"], dbs["blobs"]
    for parent in manifest.parents:
        if txn.get(cid_key(parent), db=snapshots) is None:
            raise MissingObject("snapshot", parent)
    if check_pages:
        cur = txn.cursor(db=dbs["pages"])
        for key in page_keys:
            if not cur.set_key(key):
                raise MissingObject("page", key.hex())
    for seq in manifest.sequences:
        blob = txn.get(bytes.fromhex(seq.tokens.digest), db=blobs)
        if blob is None:
            raise MissingObject("blob", seq.tokens.digest)
        if len(blob) != 4 * seq.tokens.count:
            raise InvalidManifest(
                f"token blob {seq.tokens.digest} holds {len(blob) // 4} ids, not {seq.tokens.count}"
            )
    for digest_hex, table in tables.items():
        put_blob(txn, dbs, bytes.fromhex(digest_hex), table, t_us)
    if manifest.store_version > 1:
        require_version(txn, dbs, manifest.store_version)
    key = cid_key(cid)
    created = txn.put(key, data, overwrite=False, db=snapshots)
    stamp(txn, dbs, JOURNAL_SNAPSHOT, key, t_us)
    return created


def load_stored(txn: lmdb.Transaction, dbs: dict[str, Any], cid: str) -> dict[str, Any]:
    """The stored manifest dict of `cid`, verified against its key."""
    raw = txn.get(cid_key(cid), db=dbs["snapshots"])
    if raw is None:
        raise MissingObject("snapshot", cid)
    actual = cid_of(raw)
    if actual != cid:
        raise CorruptPage(cid, actual, "snapshot")
    try:
        d = json.loads(bytes(raw))
    except ValueError as exc:
        raise InvalidManifest(f"{cid} is not JSON: {exc}") from None
    if not isinstance(d, dict):
        raise InvalidManifest(f"{cid} is not a JSON object")
    return d


def load_manifest(txn: lmdb.Transaction, dbs: dict[str, Any], cid: str) -> Manifest:
    """The in-memory manifest of `cid`: stored form plus its page tables."""
    d = load_stored(txn, dbs, cid)
    tables = {}
    for s in stored_sequences(d):
        digest_hex = s["pages"]["digest"]
        raw = txn.get(bytes.fromhex(digest_hex), db=dbs["blobs"])
        if raw is None:
            raise MissingObject("blob", digest_hex)
        tables[digest_hex] = bytes(raw)
    manifest = Manifest.from_stored(d, tables)
    if cid_of(manifest.canonical_bytes()) != cid:
        raise CorruptPage(cid, manifest.cid, "snapshot")
    return manifest


def require_version(txn: lmdb.Transaction, dbs: dict[str, Any], version: int) -> None:
    """Raise the store's format record to ``version`` (in the caller's transaction) before it
    holds an object that releases reading only older versions would misread: they refuse
    the store instead, and never gc pages they cannot see are used."""
    from processfork.store.digest import canonical_json
    from processfork.store.env import META_FORMAT_KEY, check_format_record

    record = check_format_record(txn.get(META_FORMAT_KEY, db=dbs["meta"]))
    if int(record["version"]) < version:
        txn.put(META_FORMAT_KEY, canonical_json({**record, "version": version}), db=dbs["meta"])
