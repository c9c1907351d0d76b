"""Remotes: push, fetch and pull snapshots through S3-compatible object storage.

A remote holds the store's objects under the same addresses, in immutable packs with an index,
and refs moved by conditional writes (docs/format.md, "Remotes"). Modules, one job each:
`url` (s3:// URLs), `objstore` (the S3 calls, boto3), `layout` (paths and records), `pack`
(packs and their indexes), `remote` (one remote: format, refs, indexes, verified range reads),
`feed` (the bounded queue between range reads and the store's writes), `local` (what the local
store holds), `push`, `fetch` (fetch and pull), `gc` (unreferenced packs),
`config` (named remotes in `meta`).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from processfork.store.remote.config import (
    add_remote,
    get_remote_url,
    list_remotes,
    remove_remote,
    validate_remote_name,
)
from processfork.store.remote.errors import (
    CorruptRemoteObject,
    InvalidRemoteUrl,
    NonFastForward,
    RemoteError,
    RemoteExists,
    RemoteFormatUnsupported,
    RemoteUnreachable,
    UnknownRemote,
)
from processfork.store.remote.url import RemoteUrl, parse_url

if TYPE_CHECKING:
    from processfork.store.env import Env
    from processfork.store.remote.objstore import ObjectStore
    from processfork.store.remote.remote import Remote

__all__ = [
    "INDEX_CACHE_DIR",
    "CorruptRemoteObject",
    "InvalidRemoteUrl",
    "NonFastForward",
    "RemoteError",
    "RemoteExists",
    "RemoteFormatUnsupported",
    "RemoteUnreachable",
    "RemoteUrl",
    "UnknownRemote",
    "add_remote",
    "get_remote_url",
    "list_remotes",
    "open_remote",
    "parse_url",
    "remove_remote",
    "validate_remote_name",
]

#: The folder of the store's directory that caches remote pack indexes (immutable objects).
INDEX_CACHE_DIR = "remote-index"


def open_remote(
    url: str, *, env: Env | None = None, parallelism: int = 8, reuse: bool = False
) -> Remote:
    """A client for the remote at `url` (`s3://BUCKET/PREFIX`); with `env`, pack indexes are
    cached in the store's directory. `reuse` shares one S3 client per URL in this process (a
    server's checkouts: making a client costs about 0.3 s)."""
    from processfork.store.remote.objstore import ObjectStore
    from processfork.store.remote.remote import Remote

    cache = None if env is None else os.path.join(env.path, INDEX_CACHE_DIR)
    if not reuse:
        return Remote(ObjectStore(parse_url(url), parallelism=parallelism), index_cache=cache)
    with _SHARED_LOCK:
        store = _SHARED.get((url, parallelism))
        if store is None:
            store = _SHARED[(url, parallelism)] = ObjectStore(parse_url(url), parallelism=parallelism)
    return Remote(store, index_cache=cache)


_SHARED: dict[tuple[str, int], ObjectStore] = {}
_SHARED_LOCK = threading.Lock()
