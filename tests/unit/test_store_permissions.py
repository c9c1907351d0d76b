"""The store is owner-only: it holds every agent's token ids and KV pages."""

from __future__ import annotations

import logging
import os
import stat

import pytest
from processfork.store import Store


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    """The usual umask, under which files are created world-readable unless asked otherwise."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_new_store_is_owner_only(tmp_path, open_umask):
    path = tmp_path / "store"
    with Store(path) as store:
        store.put_pages([b"secret" * 10])
    assert mode(path) == 0o700
    assert mode(path / "data.mdb") == 0o600
    assert mode(path / "lock.mdb") == 0o600


def test_an_existing_readable_store_is_made_owner_only_with_a_warning(tmp_path, open_umask, caplog):
    path = tmp_path / "store"
    Store(path).close()
    os.chmod(path, 0o755)
    os.chmod(path / "data.mdb", 0o644)
    os.chmod(path / "lock.mdb", 0o664)
    with caplog.at_level(logging.WARNING, logger="processfork.store"), Store(path) as store:
        assert store.status().num_pages == 0
    assert (mode(path), mode(path / "data.mdb"), mode(path / "lock.mdb")) == (0o700, 0o600, 0o600)
    [record] = [r for r in caplog.records if "owner-only" in r.getMessage()]
    assert "the directory 0755" in record.getMessage() and "data.mdb 0644" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="processfork.store"):
        Store(path).close()
    assert not [r for r in caplog.records if "owner-only" in r.getMessage()]


def test_pf_status_warns_once_in_one_line(tmp_path, open_umask):
    from test_cli_support import pf

    path = tmp_path / "store"
    Store(path).close()
    os.chmod(path / "data.mdb", 0o644)
    result = pf(path, "status")
    assert result.exit_code == 0
    assert "made it owner-only" in result.stderr
    assert mode(path / "data.mdb") == 0o600
