"""`pf gc` and `pf fork` killed with SIGKILL at random points of their work.

Each trial runs the real command as a subprocess on a real store and kills it at a point chosen
from what the store shows of its progress, never from the clock alone: the command appears in
LMDB's reader table when it opens the store, and each of gc's sweep transactions removes objects
when it commits. A calibration run measures how long each of those stages lasts on this machine,
now; a trial picks a stage, waits until the store shows it has begun, and kills after a random
part of its calibrated length. The choices come from a seeded generator (``PF_CRASH_SEED``), so a
failing sequence of kills can be replayed.

After every kill: fsck finds nothing, every referenced snapshot is intact (each page re-hashed),
and for ``fork`` either all N children exist, each with one reflog entry, or none does (the fork
is one write transaction). The default run kills each command a few times; the ``slow`` variant
kills it ``PF_CRASH_TRIALS`` times (default 20). Figures: docs/reliability.md, "Crashes".
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from processfork.store import Store
from processfork.store.gc import SWEEP_CHUNK
from store_helpers import assert_intact, make_snapshot, random_pages

SEED = int(os.environ.get("PF_CRASH_SEED", "20261201"))
SLOW_TRIALS = int(os.environ.get("PF_CRASH_TRIALS", "20"))
CI_TRIALS = 5
POLL_S = 0.001

# Garbage for gc: one and a half sweep transactions' worth, so kills land in the mark, in the
# first sweep transaction, between the two commits and after the last one.
GARBAGE = SWEEP_CHUNK + 25_000
LOOSE_SNAPSHOTS = 30
FORK_N = 4096


def trial_counts() -> list:
    return [
        pytest.param(CI_TRIALS, id=f"{CI_TRIALS}-kills"),
        pytest.param(SLOW_TRIALS, id=f"{SLOW_TRIALS}-kills", marks=pytest.mark.slow),
    ]


def pf_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "processfork_cli", *args]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Every process a test starts; any still running when it ends are killed and reaped."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def has_reader(store: Store, pid: int) -> bool:
    """Whether process `pid` holds a slot in the store's reader table (it has opened the store)."""
    lines = store.env.env.readers().splitlines()[1:]
    return any(line.split()[:1] == [str(pid)] for line in lines)


def object_count(store: Store, dbs: tuple[str, ...]) -> int:
    return store.env.read(lambda txn: sum(txn.stat(store.dbs[n])["entries"] for n in dbs))


@dataclass
class Run:
    """One command run, watched through the store: when it opened the store, and when each of its
    commits became visible (the object count changed)."""

    proc: subprocess.Popen
    opened: float | None = None
    commits: list[float] = field(default_factory=list)
    killed_at_stage: int | None = None

    def events(self) -> list[float]:
        return ([self.opened] if self.opened is not None else []) + self.commits


def watch(
    store: Store, proc: subprocess.Popen, counter: Callable[[], int],
    until: Callable[[Run], bool] = lambda run: False,
) -> Run:
    """Poll the store until the process exits or `until(run)` holds."""
    run = Run(proc)
    last = counter()
    while proc.poll() is None and not until(run):
        now = time.monotonic()
        if run.opened is None:
            if has_reader(store, proc.pid):
                run.opened = now
        else:
            count = counter()
            if count != last:
                last = count
                run.commits.append(now)
        time.sleep(POLL_S)
    return run


def stage_lengths(run: Run, ended: float) -> list[float]:
    """Seconds from each progress event to the next (the last one: to the process's exit)."""
    marks = [*run.events(), ended]
    return [b - a for a, b in itertools.pairwise(marks)]


def calibrate(store: Store, argv: list[str], counter: Callable[[], int], log: Path,
              processes: list[subprocess.Popen]) -> list[float]:
    """Run the command to the end once; the lengths of its stages (opened, then each commit)."""
    proc = start(argv, log, processes)
    run = watch(store, proc, counter)
    proc.wait()
    ended = time.monotonic()
    assert proc.returncode == 0, log.read_text()[-2000:]
    if run.opened is None:  # exited between two polls: one stage, as long as the run
        return [0.01]
    return stage_lengths(run, ended)


def start(argv: list[str], log: Path, processes: list[subprocess.Popen]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PF_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    processes.append(proc)
    return proc


class StagePicker:
    """Stages in random order, each one once per round, so that a few trials cover them all."""

    def __init__(self, count: int, rng: random.Random) -> None:
        self.count, self.rng, self.queue = count, rng, []

    def __call__(self) -> int:
        if not self.queue:
            self.queue = list(range(self.count))
            self.rng.shuffle(self.queue)
        return self.queue.pop()


def kill_at_random_stage(
    store: Store, argv: list[str], counter: Callable[[], int], stages: list[float], stage: int,
    rng: random.Random, log: Path, processes: list[subprocess.Popen],
) -> Run:
    """Start the command, wait until the store shows that `stage` has begun, then SIGKILL it
    after a random part of that stage's calibrated length. `run.killed_at_stage` is None when
    the command exited on its own first."""
    delay = rng.uniform(0.0, stages[stage])
    proc = start(argv, log, processes)
    run = watch(store, proc, counter, until=lambda r: len(r.events()) > stage)
    if proc.poll() is None:
        time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    # It may have exited between the last poll and the signal: then it finished.
    assert proc.returncode in (0, -signal.SIGKILL), log.read_text()[-2000:]
    if proc.returncode == -signal.SIGKILL:
        run.killed_at_stage = stage
    return run


# --- gc ---------------------------------------------------------------------------------------


@dataclass
class GcStore:
    """A store with snapshots that must survive and a lot of garbage of every kind."""

    store: Store
    path: Path
    keep: dict[str, str] = field(default_factory=dict)  # ref -> cid
    live_pin: list[bytes] = field(default_factory=list)
    kept_objects: int = 0
    dead_pins: int = 0

    def check(self) -> None:
        store = self.store
        assert list(store.fsck()) == []
        assert store.list_refs() == self.keep
        for cid in self.keep.values():
            assert_intact(store, cid)
        for digest in self.live_pin:
            store.get_page(digest)
        assert set(store.get_pin("live")) == set(self.live_pin)

    def garbage(self) -> int:
        return object_count(self.store, ("pages", "blobs", "snapshots")) - self.kept_objects

    def refill(self, rng: random.Random) -> None:
        """Top the garbage up to GARBAGE objects: unreferenced snapshots (some sharing pages with
        kept ones), orphan token arrays, pages held only by the pin of a writer that has exited,
        and plain orphan pages."""
        store = self.store
        kept = list(self.keep.values())
        loose = object_count(store, ("snapshots",)) - len(self.keep)
        for i in range(max(0, LOOSE_SNAPSHOTS - loose)):
            shared = store.get_snapshot(rng.choice(kept)).sequences[0].pages[:2]
            own = random_pages(4, 512)
            pages = [bytes.fromhex(d) for pair in shared for d in pair]
            pages = [store.get_page(d) for d in pages] + own
            make_snapshot(store, f"loose/{i}", tokens=[rng.randrange(50_000) for _ in range(64)],
                          pages=pages)
        for _ in range(LOOSE_SNAPSHOTS):  # (every write is a durable commit: a few of each kind)
            store.put_tokens([rng.randrange(50_000) for _ in range(rng.randint(10, 99))])
        if not any(p is not None and p.owner_dead() for p in store.list_pins().values()):
            self.dead_pins += 1
            writer = (
                "import os, sys\n"
                "from processfork.store import Store\n"
                "with Store(sys.argv[1]) as s:\n"
                "    s.put_pages([os.urandom(2048) for _ in range(500)], pin=sys.argv[2])\n"
            )
            subprocess.run([sys.executable, "-c", writer, str(self.path),
                            f"killed-writer-{self.dead_pins}"], check=True)
        while (missing := GARBAGE - self.garbage()) > 0:
            batch = min(missing, 20_000)
            size = rng.choice((64, 64, 64, 4096))
            data = memoryview(rng.randbytes(batch * size))
            store.put_pages([data[i : i + size] for i in range(0, len(data), size)], pin="refill")
            store.drop_pin("refill")


@pytest.fixture
def gc_store(tmp_path: Path) -> Iterator[GcStore]:
    path = tmp_path / "store"
    with Store(path) as store:
        world = GcStore(store, path)
        parent = None
        for i in range(12):
            cid = make_snapshot(store, f"keep/{i}", parents=[parent] if parent else [],
                                tokens=list(range(i, i + 200)), ref=f"keep/{i}",
                                move_head=i == 11)
            world.keep[f"keep/{i}"] = cid
            parent = cid if i % 3 else None
        # A writer in progress (this process, alive): its pages are pinned, named by no snapshot.
        world.live_pin = store.put_pages(random_pages(40, 1024), pin="live").digests
        world.kept_objects = object_count(store, ("pages", "blobs", "snapshots"))
        yield world


@pytest.mark.parametrize("trials", trial_counts())
def test_gc_killed_mid_sweep_leaves_a_consistent_store(gc_store, tmp_path, processes, trials):
    rng = random.Random(SEED)
    world, store = gc_store, gc_store.store
    argv = pf_argv("gc", "--store", str(world.path), "--prune", "now", "--json")
    counter = partial(object_count, store, ("pages", "blobs", "snapshots"))
    log = tmp_path / "gc.log"

    world.refill(rng)
    stages = calibrate(store, argv, counter, log, processes)
    world.check()
    assert world.garbage() == 0
    assert not any(p is None or p.owner_dead() for p in store.list_pins().values())

    kills, finished, where = 0, 0, []
    pick = StagePicker(len(stages), rng)
    while kills < trials:
        assert finished <= 2 * trials, "the command kept finishing before its kill"
        world.refill(rng)
        before = world.garbage()
        run = kill_at_random_stage(store, argv, counter, stages, pick(), rng, log, processes)
        if run.killed_at_stage is None:
            finished += 1
        else:
            kills += 1
            where.append((run.killed_at_stage, before - world.garbage()))
        world.check()

    # The next full gc completes and leaves exactly what is referenced or pinned by a live writer.
    final = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    world.check()
    assert world.garbage() == 0
    assert list(store.list_pins()) == ["live"]
    assert store.status().abandoned_pins == 0
    print(f"seed {SEED}: {kills} kills of pf gc (stage, objects removed before the kill): "
          f"{where}; {finished} runs finished before their kill; stages {stages}")


def test_gc_drops_the_job_record_of_a_killed_writer(tmp_path):
    """A server killed after a snapshot job's last save and before the commit leaves the job's
    pin and its final record (`job:<id>`), which commit in one transaction. gc drops both, and
    the record another tensor-parallel rank wrote for the job (`job:<id>.r1`); the records of a
    live writer's job and other meta records stay."""
    path = tmp_path / "store"
    dead, live = "a" * 32, "b" * 32

    def record(result) -> dict:
        pages = [d.hex() for d in result.digests]
        return {"blocks": 1, "bytes_written": 512, "final": True, "new_blocks": 1,
                "pages": [pages]}

    writer = (
        "import os, sys\n"
        "from processfork.store import Store\n"
        "with Store(sys.argv[1]) as s:\n"
        "    s.put_pages([os.urandom(256), os.urandom(256)], pin=sys.argv[2],\n"
        "                meta=lambda r: {'job:' + sys.argv[2]: {'final': True, 'blocks': 1}})\n"
        "    s.meta_put('job:' + sys.argv[2] + '.r1', {'final': True, 'blocks': 1})\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(path), dead], check=True)
    with Store(path) as store:
        store.put_pages(random_pages(2), pin=live, meta=lambda r: {f"job:{live}": record(r)})
        store.meta_put(f"job:{live}.r1", {"final": True, "blocks": 1})
        store.meta_put("engine:0", {"model": "test"})
        assert store.list_pins()[dead].owner_dead()
        stats = store.gc(prune="now")
        assert (stats.removed_pins, stats.removed_pages) == (1, 2)
        assert set(store.list_pins()) == {live}
        assert set(store.meta_items()) == {"format", f"job:{live}", f"job:{live}.r1",
                                           "engine:0"}
        assert list(store.fsck()) == []


# --- fork -------------------------------------------------------------------------------------


@pytest.mark.parametrize("trials", trial_counts())
def test_fork_killed_mid_commit_is_all_or_nothing(tmp_path, processes, trials):
    """Each trial forks in its own copy of one small store, so that every check covers the whole
    store in a bounded time: all 4096 children and their reflogs, or none of them."""
    rng = random.Random(SEED + 1)
    template = tmp_path / "template"
    with Store(template) as store:
        base = make_snapshot(store, "base", tokens=list(range(30 * 16)), ref="base",
                             move_head=True)
        head_log = store.reflog("HEAD")

    def fork_argv(path: Path) -> list[str]:
        return pf_argv("fork", "base", "-n", str(FORK_N), "--name", "child",
                       "--store", str(path), "--json")

    def copy(name: str) -> Path:
        path = tmp_path / name
        shutil.copytree(template, path)
        return path

    path = copy("calibration")
    with Store(path) as store:
        counter = partial(object_count, store, ("snapshots",))
        stages = calibrate(store, fork_argv(path), counter, tmp_path / "fork.log", processes)
        check_fork_store(store, base, head_log, committed=True)
    shutil.rmtree(path)

    kills = finished = committed = attempt = 0
    pick = StagePicker(len(stages), rng)
    while kills < trials:
        assert finished <= 2 * trials, "the command kept finishing before its kill"
        path = copy(f"trial{attempt}")
        attempt += 1
        with Store(path) as store:
            counter = partial(object_count, store, ("snapshots",))
            run = kill_at_random_stage(store, fork_argv(path), counter, stages, pick(), rng,
                                       tmp_path / "fork.log", processes)
            refs = store.list_refs()
            children = sum(1 for r in refs if r.startswith("child/"))
            assert children in (0, FORK_N), f"{children} of {FORK_N} children after the kill"
            assert counter() == 1 + children
            check_fork_store(store, base, head_log, committed=bool(children))
            # The next writer proceeds (LMDB releases a killed writer's lock).
            store.set_ref("after", base)
            assert store.gc(prune="now").removed_snapshots == 0
        if run.killed_at_stage is None:
            finished += 1
        else:
            kills += 1
            committed += bool(children)
        shutil.rmtree(path)
    print(f"seed {SEED + 1}: {kills} kills of pf fork -n {FORK_N}: {committed} after its commit, "
          f"{kills - committed} before; {finished} runs finished first; stages {stages}")


def check_fork_store(store: Store, base: str, head_log: list, *, committed: bool) -> None:
    """fsck is clean and HEAD did not move. Committed: every child exists, names the base as its
    parent and its fork position, and has exactly one reflog entry, a `fork` that created it.
    Not committed: no child ref and no reflog entry of one, and no snapshot but the base."""
    assert list(store.fsck()) == []
    refs = store.list_refs()
    assert refs.get("base") == base
    assert store.reflog("HEAD") == head_log
    children = [f"child/{i}" for i in range(FORK_N)]
    if not committed:
        assert sorted(refs) in (["base"], ["after", "base"])
        assert all(store.reflog(c) == [] for c in children)
        assert [cid for cid, _ in store.iter_snapshots()] == [base]
        return
    cids = set()
    for i, child in enumerate(children):
        entries = store.reflog(child)
        assert len(entries) == 1
        entry = entries[0]
        assert (entry.old, entry.new, entry.action) == (None, refs[child], "fork")
        manifest = store.get_snapshot(refs[child])
        assert manifest.parents == [base]
        assert manifest.fork is not None and (manifest.fork.index, manifest.fork.of) == (i, FORK_N)
        cids.add(refs[child])
    assert len(cids) == FORK_N
    assert_intact(store, refs[children[0]])
