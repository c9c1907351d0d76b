"""Several processes on one store: writers killed with SIGKILL mid-write, and writers racing gc.

Writers are real processes (tests/unit/store_writer.py) on a real LMDB directory. What a writer
printed was committed before it printed it, so it must survive anything that happens afterwards.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from processfork.store import Store
from store_helpers import assert_intact

WRITER = str(Path(__file__).with_name("store_writer.py"))
CID_LINE = re.compile(r"^cid (sha256:[0-9a-f]{64})$")
KILLS = 50
PARALLEL = 2


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WRITER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def ready(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """Wait until the process has opened the store (start-up time is not what is being tested)."""
    assert proc.stdout is not None and proc.stderr is not None
    fd, first = proc.stdout.fileno(), b""
    while not first.endswith(b"\n"):  # byte by byte: communicate() must get every later line
        chunk = os.read(fd, 1)
        if not chunk:
            break
        first += chunk
    assert first == b"ready\n", first.decode() + proc.stderr.read()
    return proc


def read_lines(proc: subprocess.Popen[str], lines: int) -> str:
    """The next `lines` lines the process prints (byte by byte, as in `ready`)."""
    assert proc.stdout is not None
    fd, got = proc.stdout.fileno(), b""
    while got.count(b"\n") < lines:
        chunk = os.read(fd, 1)
        if not chunk:
            break
        got += chunk
    return got.decode()


def spawn_all(
    children: list[subprocess.Popen[str]], *commands: tuple[str, ...]
) -> list[subprocess.Popen[str]]:
    """Start all, then wait for all, so their interpreters start up in parallel."""
    procs = [start(*c) for c in commands]
    children.extend(procs)
    return [ready(p) for p in procs]


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started; any still running when it ends (a failed assertion) are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def committed(output: str) -> list[str]:
    """cids of complete lines only: a kill can cut the last line short."""
    return [m.group(1) for line in output.splitlines() if (m := CID_LINE.match(line))]


def check_store(path: Path, cids: list[str]) -> None:
    with Store(path) as store:
        assert list(store.fsck()) == []
        for cid in cids:
            assert_intact(store, cid)
            m = store.get_snapshot(cid)
            digests = [bytes.fromhex(d) for pair in m.sequences[0].pages for d in pair]
            out = np.empty(len(digests) * 32 * 1024, dtype=np.uint8)
            store.read_pages_into(digests, out, 32 * 1024, verify=True)


def test_writers_killed_at_random_points_lose_nothing_committed(tmp_path, children):
    path = tmp_path / "store"
    Store(path).close()
    rng = random.Random(1234)
    printed: list[str] = []
    for wave in range(KILLS // PARALLEL):
        procs = spawn_all(
            children,
            *[("write", str(path), f"crash{k}", "0", str(wave * 10 + k)) for k in range(PARALLEL)],
        )
        # Let each writer commit 1-3 snapshots first (however busy the machine), then kill it
        # at a random point of its next ones.
        early = [read_lines(proc, rng.randint(1, 3)) for proc in procs]
        time.sleep(rng.uniform(0.0, 0.05))
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        for proc, first in zip(procs, early):
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == -signal.SIGKILL, err
            printed += committed(first + out)
    assert len(printed) >= KILLS  # the kills did land between and during commits
    check_store(path, printed)
    with Store(path) as store:
        pins = store.list_pins()
        assert pins and all(p is not None and p.owner_dead() for p in pins.values())
        # The killed writers' pins are fresh, but their owners are gone: gc drops them at once
        # and reclaims what only they held, and nothing committed.
        stats = store.gc(prune="now")
        assert stats.removed_snapshots == 0
        assert stats.removed_pins == len(pins)
        assert store.list_pins() == {}
        assert stats.removed_pages > 0
        assert store.gc(prune="now").removed_pages == 0
    check_store(path, printed)


def test_four_writers_and_gc_without_grace_lose_nothing_reachable(tmp_path, children):
    path = tmp_path / "store"
    stop = tmp_path / "stop"
    Store(path).close()
    collector, *writers = spawn_all(
        children,
        ("gc", str(path), str(stop)),
        *[("write", str(path), f"w{k}", "24", str(k)) for k in range(4)],
    )
    printed: list[str] = []
    for proc in writers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:] + err[-2000:]
        printed += committed(out)
    stop.touch()
    out, err = collector.communicate(timeout=300)
    assert collector.returncode == 0, out[-2000:] + err[-2000:]
    runs, removed = (int(x) for x in out.split("gc ")[-1].split())
    assert runs >= 2
    assert removed >= 4  # at least each writer's last abandoned page
    assert len(printed) == 4 * (24 + 2 * 5)
    check_store(path, printed)
    with Store(path) as store:
        assert store.list_pins() == {}  # every writer dropped its pins with its snapshots
        assert store.gc(prune="now", expire="now").removed_pages == 0  # nothing left to collect
        assert all(store.has_snapshot(c) for c in printed)  # refs' ancestors, fork refs
    check_store(path, printed)
