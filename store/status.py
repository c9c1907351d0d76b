"""`Store.status()`: sizes and counts for `pf status` and `GET /status`, from one read transaction."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import lmdb
from processfork.store.env import META_FORMAT_KEY
from processfork.store.objects import read_pins
from processfork.store.refs import HEAD, HeadInfo, read_head

if TYPE_CHECKING:
    from processfork.store.env import Env

__all__ = ["StoreStatus", "compute_status"]


@dataclass(frozen=True)
class StoreStatus:
    """`size_bytes` is the part of the data file in use (LMDB pages up to the last one written);
    `file_bytes` what the file occupies; `map_size` the current LMDB map size."""

    path: str
    format: str
    size_bytes: int
    map_size: int
    num_pages: int
    page_bytes: int
    num_blobs: int
    num_snapshots: int
    num_refs: int
    head: HeadInfo
    created: str = ""
    num_pins: int = 0
    file_bytes: int = 0
    version: int = 0
    abandoned_pins: int = 0
    """Pins whose writer has exited (or that are a day old): the next gc drops them."""
    abandoned_pin_bytes: int = 0
    """What the abandoned pins hold (pages and blobs, each counted once). gc reclaims the part that
    no snapshot shares once its grace period (`--prune`) has passed."""


def _abandoned_pins(txn: lmdb.Transaction, dbs: dict) -> tuple[int, int]:
    count, digests = 0, set()
    for info in read_pins(txn, dbs).values():
        if info is not None and info.abandoned():
            count += 1
            digests.update(info.digests)
    held = 0
    for digest in digests:
        value = txn.get(digest, db=dbs["pages"])
        if value is None:
            value = txn.get(digest, db=dbs["blobs"])
        held += 0 if value is None else len(value)
    return count, held


def compute_status(env: Env) -> StoreStatus:
    dbs = env.dbs

    def run(txn: lmdb.Transaction) -> StoreStatus:
        info = env.info()
        psize = env.stat()["psize"]
        page_bytes = sum(len(v) for v in txn.cursor(db=dbs["pages"]).iternext(keys=False))
        refs = sum(
            1
            for k in txn.cursor(db=dbs["refs"]).iternext(values=False)
            if bytes(k) != HEAD.encode()
        )
        meta = json.loads(bytes(txn.get(META_FORMAT_KEY, db=dbs["meta"])))
        try:
            file_bytes = os.path.getsize(os.path.join(env.path, "data.mdb"))
        except OSError:
            file_bytes = 0
        abandoned, abandoned_bytes = _abandoned_pins(txn, dbs)
        return StoreStatus(
            path=env.path,
            format=str(meta["format"]),
            size_bytes=(info["last_pgno"] + 1) * psize,
            map_size=info["map_size"],
            num_pages=txn.stat(dbs["pages"])["entries"],
            page_bytes=page_bytes,
            num_blobs=txn.stat(dbs["blobs"])["entries"],
            num_snapshots=txn.stat(dbs["snapshots"])["entries"],
            num_refs=refs,
            head=read_head(txn, dbs),
            created=str(meta.get("created", "")),
            num_pins=txn.stat(dbs["pins"])["entries"],
            file_bytes=file_bytes,
            version=int(meta["version"]),
            abandoned_pins=abandoned,
            abandoned_pin_bytes=abandoned_bytes,
        )

    return env.read(run, buffers=True)
