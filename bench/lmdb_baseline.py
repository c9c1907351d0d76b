"""The bare-LMDB baseline that store and snapshot writes are compared with.

One module so both benchmarks time exactly the same thing: a ``txn.put`` loop under
precomputed keys, in one transaction of an environment opened with the store's settings
(durable commit, no ``writemap``; see store/env.py), committed once. It does not hash.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence

import lmdb
from processfork.store.env import MAX_DBS

# map_size is only address space (the file is sparse), so one size serves every page count.
STORE_ENV_SETTINGS = {
    "map_size": 1 << 34,
    "subdir": True,
    "metasync": True,
    "sync": True,
    "writemap": False,
    "max_dbs": MAX_DBS,
    "max_readers": 512,
}


def bare_put_seconds(keys: Sequence[bytes], pages: Sequence[object], root: str) -> float:
    """Seconds to put ``pages`` under ``keys`` into a fresh environment in ``root``, committed."""
    d = tempfile.mkdtemp(dir=root)
    env = lmdb.open(d, **STORE_ENV_SETTINGS)
    try:
        db = env.open_db(b"pages")
        t = time.perf_counter()
        with env.begin(write=True) as txn:
            for k, p in zip(keys, pages):
                txn.put(k, p, db=db)
        return time.perf_counter() - t
    finally:
        env.close()
        shutil.rmtree(d)
