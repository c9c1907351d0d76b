"""Damaging stored objects behind the store's back, as a bad disk would: for the tests of fsck,
checkout's verification and repair. Opens the LMDB files directly (the store may be open in other
processes, such as a running server)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["damage_object", "delete_object"]


def _write(store: str | os.PathLike[str], db: str, digest: str, fill: bytes | None) -> None:
    import lmdb

    env = lmdb.open(str(store), max_dbs=16, map_size=1 << 36)
    try:
        handle = env.open_db(db.encode(), create=False)
        with env.begin(write=True, db=handle) as txn:
            key = bytes.fromhex(digest)
            value = txn.get(key)
            if value is None:
                raise KeyError(f"no {db} record {digest}")
            if fill is None:
                txn.delete(key)
            else:
                txn.put(key, (fill * len(value))[: len(value)])
    finally:
        env.close()


def damage_object(
    store: str | os.PathLike[str] | Path, digest: str, *, db: str = "pages", fill: bytes = b"\x5a"
) -> None:
    """Overwrite one stored page (or blob, with db="blobs") with `fill`, keeping its size."""
    _write(store, db, digest, fill)


def delete_object(store: str | os.PathLike[str] | Path, digest: str, *, db: str = "pages") -> None:
    """Remove one stored page (or blob) as if it had never been written."""
    _write(store, db, digest, None)
