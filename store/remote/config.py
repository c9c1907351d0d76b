"""Named remotes of a store: `remote:<name>` records in `meta` ({"url": "s3://..."})."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import lmdb
from processfork.store import meta as _meta
from processfork.store.errors import InvalidName
from processfork.store.remote.errors import RemoteExists, UnknownRemote
from processfork.store.remote.url import parse_url

if TYPE_CHECKING:
    from processfork.store.env import Env

__all__ = ["add_remote", "get_remote_url", "list_remotes", "remove_remote", "validate_remote_name"]

_PREFIX = "remote:"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_remote_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith((".", ".lock")):
        raise InvalidName(
            str(name), "a remote name is 1 to 64 letters, digits, '.', '_' or '-', no '/'"
        )
    return name


def add_remote(env: Env, name: str, url: str) -> str:
    validate_remote_name(name)
    normalized = str(parse_url(url))

    def run(txn: lmdb.Transaction) -> None:
        old = _meta.meta_get(txn, env.dbs, _PREFIX + name)
        if old is not None:
            raise RemoteExists(name, str(old.get("url")))
        _meta.meta_put(txn, env.dbs, _PREFIX + name, {"url": normalized})

    env.write(run)
    return normalized


def remove_remote(env: Env, name: str) -> str:
    """Forget remote `name`; its tracking refs (`remotes/<name>/...`) stay until deleted."""

    def run(txn: lmdb.Transaction) -> str:
        old = _meta.meta_get(txn, env.dbs, _PREFIX + name)
        if old is None:
            raise UnknownRemote(name)
        _meta.meta_delete(txn, env.dbs, _PREFIX + name)
        return str(old.get("url"))

    return env.write(run)


def list_remotes(env: Env) -> dict[str, str]:
    items = env.read(lambda txn: _meta.meta_items(txn, env.dbs, _PREFIX))
    return {k[len(_PREFIX) :]: str(v.get("url")) for k, v in sorted(items.items())}


def get_remote_url(env: Env, name: str) -> str:
    record = env.read(lambda txn: _meta.meta_get(txn, env.dbs, _PREFIX + name))
    if record is None:
        raise UnknownRemote(name)
    return str(record.get("url"))
