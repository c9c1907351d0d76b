"""The remote commands as one call each, on an open `Store`: what `pf push/fetch/pull/clone`
and `pf gc --remote` run. Each takes a remote name (`origin`) or a URL (`s3://…`)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
from processfork.store import refs as _refs
from processfork.store.errors import InvalidArgument
from processfork.store.remote import open_remote
from processfork.store.remote.config import add_remote, get_remote_url
from processfork.store.remote.fetch import FetchResult, RefMove, fetch, tracking_ref, update_refs
from processfork.store.remote.gc import DEFAULT_GRACE, RemoteGcStats, gc_remote
from processfork.store.remote.pack import KIND_SNAPSHOT
from processfork.store.remote.push import PushResult, push

if TYPE_CHECKING:
    from processfork.store.lmdb_store import Store

__all__ = [
    "CloneResult",
    "PullResult",
    "clone",
    "fetch_remote",
    "fetch_revision",
    "gc_remote_named",
    "pull",
    "push_refs",
    "resolve_remote",
]

Progress = Callable[[str, int, int], None]


def resolve_remote(store: Store, remote: str) -> tuple[str | None, str]:
    """(name, url) of a remote given by name, or (None, url) of one given by URL."""
    if remote.startswith("s3://"):
        return None, remote
    return remote, get_remote_url(store.env, remote)


def push_refs(
    store: Store,
    remote: str,
    refs: Sequence[str] = (),
    *,
    all_refs: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> PushResult:
    """Push local refs (default: the ref HEAD follows) to `remote`; on success, record where
    they are now in the tracking refs `remotes/<name>/<ref>`."""
    name, url = resolve_remote(store, remote)
    local_refs = store.list_refs()
    if all_refs:
        chosen = [r for r in local_refs if not r.startswith("remotes/")]
    elif refs:
        chosen = list(dict.fromkeys(refs))
    else:
        head = store.head()
        if head.ref is None:
            raise InvalidArgument("HEAD follows no ref: name the refs to push, or --all")
        chosen = [head.ref]
    wanted = {}
    for ref in chosen:
        _refs.validate_ref_name(ref)
        if ref not in local_refs:
            raise InvalidArgument(f"no local ref {ref!r} to push")
        wanted[ref] = local_refs[ref]
    client = open_remote(url, env=store.env)
    result = push(store.env, client, wanted, force=force, progress=progress)
    if name is not None:
        _set_tracking(store, name, {u.ref: u.new for u in result.refs})
    return result


def _set_tracking(store: Store, name: str, refs: dict[str, str]) -> None:
    env = store.env

    def run(txn: lmdb.Transaction) -> None:
        now = time.time()
        for ref, cid in refs.items():
            tracking = tracking_ref(name, ref)
            if _refs.read_ref(txn, env.dbs, tracking) != cid:
                _refs.set_ref(txn, env.dbs, tracking, cid, action="update",
                              message=f"push {name}", now=now)

    env.write(run)


def fetch_remote(
    store: Store, remote: str, refs: Sequence[str] = (), *, progress: Progress | None = None
) -> FetchResult:
    name, url = resolve_remote(store, remote)
    client = open_remote(url, env=store.env)
    return fetch(store.env, client, remote_name=name, names=refs or None, progress=progress)


@dataclass
class PullResult:
    fetch: FetchResult
    refs: list[RefMove] = field(default_factory=list)

    @property
    def diverged(self) -> list[RefMove]:
        return [m for m in self.refs if m.status == "diverged"]


def pull(
    store: Store,
    remote: str,
    refs: Sequence[str] = (),
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> PullResult:
    """Fetch, then fast-forward (or create) each local ref of the same name; a diverged ref is
    left alone and reported (moved with `force`)."""
    fetched = fetch_remote(store, remote, refs, progress=progress)
    moves = update_refs(store.env, fetched.refs, message=f"pull {remote}", force=force)
    return PullResult(fetched, moves)


@dataclass
class CloneResult:
    path: str
    url: str
    pull: PullResult


def clone(url: str, path: str | os.PathLike[str], *, progress: Progress | None = None) -> CloneResult:
    """A new store at `path` (a missing or empty folder) with remote `origin` at `url` and
    every remote ref. On failure the folder is removed, so nothing half-made stays."""
    from processfork.store.lmdb_store import Store
    from processfork.store.remote.url import parse_url

    url = str(parse_url(url))
    target = Path(path).expanduser()
    existed = target.exists()
    if existed and (not target.is_dir() or any(target.iterdir())):
        raise InvalidArgument(f"{target} exists and is not an empty folder")
    try:
        with Store(target) as store:
            add_remote(store.env, "origin", url)
            result = pull(store, "origin", progress=progress)
            return CloneResult(str(store.path), url, result)
    except BaseException:
        if existed:
            for child in target.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(target, ignore_errors=True)
        raise


def gc_remote_named(
    store: Store, remote: str, *, grace: float = DEFAULT_GRACE, dry_run: bool = False
) -> RemoteGcStats:
    _, url = resolve_remote(store, remote)
    return gc_remote(open_remote(url, env=store.env), grace=grace, dry_run=dry_run)


def fetch_revision(
    store: Store,
    url: str,
    rev: str,
    *,
    accept: Callable[[Mapping[str, dict[str, Any]]], None] | None = None,
) -> str | None:
    """Bring the snapshot `rev` names on the remote at `url` into the store, for a checkout of a
    snapshot the store lacks: `rev` is a full cid, or a ref of the remote (which then becomes a
    local ref, unless one of that name exists). Returns its cid, or None when the remote has no
    such snapshot or ref (a cid prefix cannot be looked up there). `accept` may refuse the
    manifests before any page moves (fetch)."""
    from processfork.store.digest import normalize_cid
    from processfork.store.errors import InvalidName

    client = open_remote(url, env=store.env, reuse=True)
    if not client.check_format(create=False):
        return None
    try:
        cid: str | None = normalize_cid(rev)
    except InvalidName:
        cid = None
    if cid is not None:
        client.load_indexes()
        if not client.has(KIND_SNAPSHOT, cid[len("sha256:") :]):
            return None
        fetch(store.env, client, cids=[cid], accept=accept, reason="a checkout")
        return cid
    try:
        _refs.validate_ref_name(rev)
    except InvalidName:
        return None
    value = client.read_ref(rev)
    if value is None:
        return None
    fetch(store.env, client, cids=[value.cid], accept=accept, reason=f"a checkout of {rev}")
    if store.get_ref(rev) is None:
        update_refs(store.env, {rev: value.cid}, message=f"checkout from {url}")
    return value.cid
