"""Pins name their owner process, and gc drops the pins of owners that have exited at once.

Liveness errs on the side of alive: a pin whose owner cannot be checked (another PID namespace,
no /proc, a pin written before owners were recorded) keeps its pages until it is a day old.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest
from processfork.store import Store
from processfork.store.owners import Liveness, Owner, current_owner, liveness, start_ticks

linux_proc = pytest.mark.skipif(
    not os.path.exists("/proc/self/stat"), reason="process liveness is read from /proc"
)


def pin_in_child(path: Path, name: str, *, wait: bool) -> subprocess.Popen[str]:
    """A process that pins one page under `name`, says so, and exits or waits for stdin."""
    code = textwrap.dedent(
        f"""
        import os, sys
        from processfork.store import Store
        with Store({str(path)!r}) as store:
            store.put_pages([os.urandom(256)], pin={name!r})
        print("pinned", flush=True)
        if {wait!r}:
            sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "pinned\n"
    return proc


def test_a_new_pin_is_owned_by_its_writer(tmp_path):
    with Store(tmp_path / "s") as store:
        store.put_pages([b"x" * 64], pin="job")
        store.pin_extend("job", [])
        info = store.list_pins()["job"]
    assert info is not None and info.owner == current_owner()
    assert info.owner.pid == os.getpid()
    assert not info.owner_dead() and not info.abandoned()


@linux_proc
def test_gc_drops_the_pins_of_exited_writers_and_keeps_those_of_live_ones(tmp_path):
    path = tmp_path / "s"
    Store(path).close()
    dead = pin_in_child(path, "dead-writer", wait=False)
    dead.wait()
    live = pin_in_child(path, "live-writer", wait=True)
    try:
        with Store(path) as store:
            pins = store.list_pins()
            assert pins["dead-writer"] is not None and pins["dead-writer"].owner_dead()
            assert pins["live-writer"] is not None and not pins["live-writer"].owner_dead()
            stats = store.gc(prune="now")
            assert stats.removed_pins == 1 and stats.removed_pages == 1
            assert set(store.list_pins()) == {"live-writer"}
            status = store.status()
            assert (status.num_pins, status.abandoned_pins, status.abandoned_pin_bytes) == (1, 0, 0)
    finally:
        assert live.stdin is not None
        live.stdin.close()
        live.wait()
    with Store(path) as store:
        status = store.status()
        assert status.abandoned_pins == 1 and status.abandoned_pin_bytes == 256
        assert store.gc(prune="now").removed_pages == 1
        assert store.list_pins() == {}


@linux_proc
def test_liveness_of_owners():
    me = current_owner()
    assert liveness(me) is Liveness.ALIVE
    assert liveness(None) is Liveness.UNKNOWN
    # Another boot: every process of it is gone.
    assert liveness(dataclasses.replace(me, boot_id=bytes(range(16)))) is Liveness.DEAD
    # The PID reused by a later process: its start time differs.
    assert liveness(dataclasses.replace(me, start_ticks=me.start_ticks + 1)) is Liveness.DEAD
    # Another PID namespace (a server in a container): its PIDs cannot be checked from here.
    assert liveness(dataclasses.replace(me, pid_namespace=me.pid_namespace + 1)) is Liveness.UNKNOWN
    # No boot id recorded (a system without /proc).
    assert liveness(dataclasses.replace(me, boot_id=bytes(16))) is Liveness.UNKNOWN


@linux_proc
def test_a_killed_process_not_yet_reaped_counts_as_dead():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = start_ticks(proc.pid)
        assert started
        owner = dataclasses.replace(current_owner(), pid=proc.pid, start_ticks=started)
        assert liveness(owner) is Liveness.ALIVE
        proc.kill()
        # Until waited for, the child is a zombie: its /proc entry stays, with state Z.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        assert liveness(owner) is Liveness.DEAD
    finally:
        proc.kill()
        proc.wait()


def test_pins_without_an_owner_still_expire_after_a_day(tmp_path):
    """Pins written before owners were recorded: a 16-byte header of two times, then digests."""
    path = tmp_path / "s"
    with Store(path) as store:
        digest = store.put_pages([b"old" * 30], pin="old-writer").digests[0]
    env = lmdb.open(str(path), max_dbs=16)
    try:
        pins = env.open_db(b"pins", create=False)
        with env.begin(write=True) as txn:
            t = 1_000_000 * int(os.path.getmtime(path / "data.mdb"))
            txn.put(b"old-writer", struct.pack("<QQ", t, t) + digest, db=pins)
    finally:
        env.close()
    with Store(path) as store:
        info = store.list_pins()["old-writer"]
        assert info is not None and info.owner is None and not info.owner_dead()
        assert store.gc(prune="now").removed_pages == 0
    with Store(path) as store:
        assert store.list_pins()["old-writer"].digests == [digest]


def test_owner_record_round_trips():
    owner = Owner(bytes(range(16)), 4026531836, 4_194_304, 2**40 + 7)
    assert Owner.unpack(owner.pack()) == owner
    assert len(owner.pack()) == Owner.SIZE == 40
