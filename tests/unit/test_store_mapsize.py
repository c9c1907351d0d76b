"""Map growth (in this process and by another one) and a full disk, on real LMDB files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest
from processfork.store import Store, StoreFull, page_digest
from store_helpers import assert_intact, make_snapshot

SMALL_MAP = 256 * 1024


def test_a_tiny_map_grows_for_one_big_transaction_and_many_small_ones(tmp_path):
    pages = [os.urandom(64 * 1024) for _ in range(64)]  # 4 MiB in ONE transaction
    with Store(tmp_path / "s", map_size=SMALL_MAP) as store:
        result = store.put_pages(pages)
        assert all(result.new) and result.bytes_written == 4 * 1024 * 1024
        for _ in range(20):
            store.put_pages([os.urandom(32 * 1024) for _ in range(4)])
        status = store.status()
        assert status.map_size > 4 * 1024 * 1024 > SMALL_MAP
        assert status.size_bytes <= status.map_size and status.num_pages == 64 + 80
        assert [store.get_page(d) for d in result.digests] == pages
        cid = make_snapshot(store, "after-growth", ref="main")
        assert_intact(store, cid)
        assert list(store.fsck()) == []


def test_growth_by_another_process_is_adopted(tmp_path):
    path = tmp_path / "s"
    with Store(path, map_size=SMALL_MAP) as store:
        mine = store.put_pages([b"mine" * 1000]).digests[0]
        script = textwrap.dedent(
            f"""
            import os
            from processfork.store import Store
            with Store({str(path)!r}, map_size={SMALL_MAP}) as s:
                r = s.put_pages([os.urandom(256 * 1024) for _ in range(32)])
                print(" ".join(d.hex() for d in r.digests))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
        )
        theirs = [bytes.fromhex(h) for h in out.stdout.split()]
        assert len(theirs) == 32
        # Our map is still 256 KiB; the file is now > 8 MiB: the next transactions must adopt it.
        assert all(store.has_pages(theirs))
        assert all(page_digest(store.get_page(d)) == d for d in theirs)
        more = store.put_pages([os.urandom(128 * 1024) for _ in range(8)])
        assert all(more.new)
        assert store.get_page(mine) == b"mine" * 1000
        assert store.status().map_size >= 8 * 1024 * 1024


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 3 MiB tmpfs mounted for the test (needs root; skipped where mounting is not allowed)."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]
    res = subprocess.run(mount, capture_output=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_is_store_full_and_loses_nothing(tiny_filesystem):
    path = tiny_filesystem / "store"
    kept: list[bytes] = []
    with Store(path, map_size=64 * 1024 * 1024) as store:
        cid = make_snapshot(store, "before", ref="main", move_head=True)
        with pytest.raises(StoreFull) as err:
            for _ in range(100):
                batch = [os.urandom(64 * 1024) for _ in range(4)]
                kept += store.put_pages(batch).digests
        assert "full" in str(err.value) and "\n" not in str(err.value)
        assert err.value.path == str(path)
        # Everything committed before the failure is intact, and the store still reads.
        assert all(store.has_pages(kept))
        assert all(page_digest(store.get_page(d)) == d for d in kept)
        assert_intact(store, cid)
        assert store.head().cid == cid
        assert list(store.fsck()) == []
    with Store(path) as store:  # and it opens again
        assert all(store.has_pages(kept))
        assert store.get_ref("main") == cid
