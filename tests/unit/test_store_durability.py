"""When a commit is durable: the environment's sync mode, and which writes sync before they return
(docs/format.md, Durability)."""

from __future__ import annotations

import os
from typing import Any

from processfork.store import Store
from processfork.store import objects as _objects


class _SyncSpy:
    """The LMDB environment with its `sync` calls recorded."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.syncs: list[bool] = []

    def sync(self, force: bool = False) -> None:
        self.syncs.append(force)
        self.inner.sync(force)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_store_syncs_at_commit_and_never_runs_without_it(tmp_path):
    with Store(tmp_path / "s") as store:
        flags = store.env.env.flags()
        # MDB_NOMETASYNC, never MDB_NOSYNC: every commit syncs its data pages before its meta page
        assert flags["sync"] is True and flags["metasync"] is False


def test_a_write_is_synced_before_it_returns_unless_its_caller_defers_it(tmp_path):
    page = os.urandom(4096)
    with Store(tmp_path / "s") as store:
        env = store.env
        spy = _SyncSpy(env.env)
        env.env = spy
        try:
            digest = store.put_pages([page]).digests[0]
            assert spy.syncs == [True]
            deferred = os.urandom(4096)
            key = _objects.page_digest(deferred)
            env.write(lambda txn: _objects.put_pages(
                txn, env.dbs, [(key, memoryview(deferred))], _objects.now_us()), durable=False)
            assert spy.syncs == [True]
            assert store.get_page(key) == deferred  # visible at once
            store.meta_put("note", {"after": digest.hex()})  # any other write: durable
            assert spy.syncs == [True, True]
        finally:
            env.env = spy.inner

