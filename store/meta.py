"""The `meta` database inside a transaction: small JSON records such as `engine:<id>` fingerprints.

The key `format` holds the format record (see env.py) and is never written through here.
"""

from __future__ import annotations

import json
from typing import Any

import lmdb
from processfork.store.digest import canonical_json
from processfork.store.env import META_FORMAT_KEY
from processfork.store.errors import InvalidName
from processfork.store.objects import validate_key_name

__all__ = ["REPLACED_PREFIX", "check_meta_key", "meta_delete", "meta_get", "meta_items",
           "meta_put", "replaced_key"]

#: `replaced:<hex of a cid>`: a snapshot a repair replaced with a recomputed copy (format.md).
REPLACED_PREFIX = "replaced:"


def replaced_key(snapshot_key: bytes) -> str:
    """The meta key that records a replacement of the snapshot stored under `snapshot_key`."""
    return REPLACED_PREFIX + bytes(snapshot_key).hex()


def check_meta_key(key: str) -> bytes:
    validate_key_name(key, "meta key")
    raw = key.encode("utf-8")
    if raw == META_FORMAT_KEY:
        raise InvalidName(key, "reserved for the format record")
    return raw


def meta_get(txn: lmdb.Transaction, dbs: dict[str, Any], key: str) -> dict[str, Any] | None:
    raw = txn.get(key.encode("utf-8"), db=dbs["meta"])
    return None if raw is None else json.loads(bytes(raw))


def meta_put(txn: lmdb.Transaction, dbs: dict[str, Any], key: str, value: dict[str, Any]) -> None:
    txn.put(check_meta_key(key), canonical_json(value), db=dbs["meta"])


def meta_delete(txn: lmdb.Transaction, dbs: dict[str, Any], key: str) -> bool:
    return bool(txn.delete(check_meta_key(key), db=dbs["meta"]))


def meta_items(
    txn: lmdb.Transaction, dbs: dict[str, Any], prefix: str
) -> dict[str, dict[str, Any]]:
    cur = txn.cursor(db=dbs["meta"])
    out = {}
    p = prefix.encode("utf-8")
    if cur.set_range(p):
        for k, v in cur:
            k = bytes(k)
            if not k.startswith(p):
                break
            out[k.decode("utf-8")] = json.loads(bytes(v))
    return out
