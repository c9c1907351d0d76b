"""The server killed with SIGKILL in the middle of a snapshot, again and again, on one store.

Each trial, on a server with a cold prefix cache:

1. checks out every snapshot committed so far and compares a greedy continuation, tokens and
   logprobs, with the warm prefix-cache hit of the engine that computed it (its *reference*);
2. takes one more snapshot to completion (HTTP 200: *acknowledged*), with its reference;
3. computes the reference of a long prompt (prefilled in many chunks), empties the prefix cache
   (vLLM's ``/reset_prefix_cache``, a dev-mode route), starts a snapshot of that prompt, which
   computes it again in the same chunks, and SIGKILLs the server's whole process group (API
   server, EngineCore, worker) at a point chosen from what the store shows of that snapshot's
   progress: its pins appear, the worker's pin grows block by block, the last block is saved
   (the commit is next). The point and a short delay after it come from a seeded generator
   (``PF_CRASH_SEED``), so a failing sequence of kills can be replayed. A long snapshot that
   committed before its kill is checked like an acknowledged one;
4. with the server dead: fsck finds nothing, every acknowledged snapshot is where its ref says and
   intact, and every pin left behind belongs to a process that has exited; then the server
   starts again on the same store.

After the last kill, ``gc(prune="now")`` must drop every abandoned pin (and the job record that a
kill between a job's last save and its commit leaves), and leave no page or blob that no snapshot
names; a last round of checkouts (step 1) then runs on the collected store.

The default run kills the server 3 times; the ``slow`` variant ``PF_CRASH_KILLS`` times
(default 20). The servers run with ``--enforce-eager``: a restart then costs no compilation.
Figures: docs/reliability.md, "Crashes".
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pf_http import PF, cached_tokens, complete, headers, pf, post, random_tokens
from processfork.store import Store

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("PF_CRASH_SEED", "20261201"))
SLOW_KILLS = int(os.environ.get("PF_CRASH_KILLS", "20"))
CI_KILLS = 3
BLOCK = 32
# A 128-token step budget prefills the long prompts in 16-27 engine steps, each saving its blocks.
SERVER_ARGS = ("--max-model-len", "4096", "--max-num-batched-tokens", "128", "--enforce-eager")
STAGES = ("pinned", "pages", "saved")
POLL_S = 0.002


def split_point(length: int) -> int:
    """Tokens vLLM's prefix cache serves for a prompt it has seen: whole blocks, never the last."""
    return (length - 1) // BLOCK * BLOCK


def prompt_length(rng: random.Random, low: int, high: int) -> int:
    """A length that does not end on a block boundary (such a snapshot adds one token)."""
    while (n := rng.randrange(low, high)) % BLOCK == 0:
        pass
    return n


@dataclass
class Reference:
    tokens: list[int]
    warm: dict[str, Any]
    """A greedy completion that hit the engine's prefix cache for every whole block."""


@dataclass
class Committed:
    name: str
    cid: str
    reference: Reference
    acknowledged: bool


@dataclass
class Figures:
    kills: int = 0
    fsck_clean: int = 0
    stages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    long_acknowledged: int = 0
    long_committed_unacknowledged: int = 0
    long_lost: int = 0
    checkouts: int = 0
    checkouts_identical: int = 0
    abandoned_pins: int = 0
    abandoned_pin_bytes: int = 0
    orphan_page_bytes: int = 0
    gc_removed_pins: int = 0
    gc_removed_page_bytes: int = 0
    orphan_page_bytes_after: int = 0
    job_records_left: int = 0


def reference(server: Any, tokens: list[int]) -> Reference:
    """Compute `tokens` cold, then the warm prefix-cache hit that restores are compared with."""
    complete(server, tokens, max_tokens=8, logprobs=5)
    warm = complete(server, tokens, max_tokens=8, logprobs=5)
    assert cached_tokens(warm) == split_point(len(tokens))
    return Reference(tokens, warm)


def check_restores(server: Any, committed: list[Committed], figures: Figures) -> None:
    """Check out each snapshot into the cold cache of a fresh server and continue from it."""
    for snap in committed:
        out = pf(server, "checkout", {"cid": snap.cid})
        length = len(snap.reference.tokens)
        assert out["tokens_already_resident"] == 0, snap.name
        assert out["tokens_loaded"] == split_point(length), snap.name
        again = complete(server, snap.reference.tokens, max_tokens=8, logprobs=5)
        assert cached_tokens(again) == split_point(length)
        got, want = again["choices"][0]["logprobs"], snap.reference.warm["choices"][0]["logprobs"]
        figures.checkouts += 1
        for key in ("tokens", "token_logprobs", "top_logprobs"):
            assert got[key] == want[key], f"{snap.name} ({snap.cid}): {key} differ"
        figures.checkouts_identical += 1


class SnapshotRequest(threading.Thread):
    """POST /snapshot in the background; `status` is None when the connection broke."""

    def __init__(self, server: Any, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.base_url}{PF}/snapshot"
        self.headers = headers(server)
        self.body = body
        self.status: int | None = None
        self.response: dict[str, Any] | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            r = httpx.post(self.url, json=self.body, headers=self.headers, timeout=300,
                           trust_env=False)
            self.status = r.status_code
            self.response = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            self.error = repr(exc)


def live_pins(store: Store) -> dict[str, int]:
    """Pins whose owner is still running, with how many digests each holds."""
    return {
        name: len(info.digests)
        for name, info in store.list_pins().items()
        if info is not None and not info.owner_dead()
    }


def wait_for_stage(
    store: Store, request: SnapshotRequest, name: str, pages: int
) -> tuple[bool, int]:
    """Wait until the store shows that the snapshot has pinned something (`pages` 0) or that the
    worker's pin holds `pages` page digests. Returns whether it did (rather than the ref
    committing or the request ending first), and the page digests pinned when last seen."""
    saved = 0
    while request.is_alive() and store.get_ref(name) is None:
        pins = live_pins(store)
        saved = max((n for p, n in pins.items() if not p.endswith(".tokens")), default=0)
        if pins and saved >= pages:
            return True, saved
        time.sleep(POLL_S)
    return False, saved


@dataclass
class Victims:
    """The server's processes and the /dev/shm files they have mapped, listed before the kill so
    that the kill itself is one signal."""

    pids: list[int]
    shared: set[str]


def victims(server: Any) -> Victims:
    import psutil

    popen = server.process.popen
    pids = [popen.pid]
    try:
        pids += [p.pid for p in psutil.Process(popen.pid).children(recursive=True)]
    except psutil.Error:
        pass
    return Victims(pids, shared_memory_files(pids))


def kill_process_group(server: Any, group: Victims) -> None:
    """SIGKILL the server's process group and every process it started; wait until all are gone.

    A killed vLLM cannot unlink its shared memory (message queues): the files in /dev/shm that
    its processes had mapped are removed here, and no others."""
    popen = server.process.popen
    os.killpg(popen.pid, signal.SIGKILL)
    for pid in group.pids:  # any that left the group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    popen.wait(60)
    deadline = time.monotonic() + 60
    while alive := [pid for pid in group.pids if _running(pid)]:
        assert time.monotonic() < deadline, f"processes {alive} survived SIGKILL"
        time.sleep(0.05)
    for path in group.shared:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def shared_memory_files(pids: list[int]) -> set[str]:
    """The /dev/shm files that these processes have mapped."""
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    path = fields[5].rstrip("\n") if len(fields) == 6 else ""
                    if path.startswith("/dev/shm/") and not path.endswith(" (deleted)"):
                        found.add(path)
        except OSError:
            pass
    return found


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def unnamed_bytes(store: Store, db: str) -> int:
    """Bytes of the pages (`db` "pages") or blobs ("blobs") that no snapshot names."""
    named: set[bytes] = set()
    for _, manifest in store.iter_snapshots():
        if db == "pages":
            named |= manifest.page_keys()
        else:
            named |= {bytes.fromhex(d) for d in manifest.blob_digests()}

    def run(txn: Any) -> int:
        cursor = txn.cursor(db=store.dbs[db])
        return sum(len(v) for k, v in cursor if bytes(k) not in named)

    return store.env.read(run, buffers=True)


def check_dead_store(store: Store, committed: list[Committed]) -> None:
    """With every server process gone: the store is consistent, the committed snapshots are where
    their refs say and whole, and every pin left is abandoned (its owner has exited)."""
    assert list(store.fsck()) == []
    for snap in committed:
        assert store.get_ref(snap.name) == snap.cid
        manifest = store.get_snapshot(snap.cid)
        assert manifest.num_tokens == len(snap.reference.tokens)
        for seq in manifest.sequences:
            assert store.get_tokens(seq.tokens) == snap.reference.tokens
            for k, v in seq.pages:  # get_page re-hashes each page
                store.get_page(bytes.fromhex(k))
                store.get_page(bytes.fromhex(v))
    pins = store.list_pins()
    assert all(info is not None and info.owner_dead() for info in pins.values()), pins
    assert store.status().abandoned_pins == len(pins)


def launch_ahead(servers):
    """The test's server on an empty store; /reset_prefix_cache (dev mode) at every start."""
    return servers.launch(store=servers.new_store("crash"), extra_args=SERVER_ARGS,
                          env={"VLLM_SERVER_DEV_MODE": "1"})


@pytest.mark.parametrize(
    "kills",
    [
        pytest.param(CI_KILLS, id=f"{CI_KILLS}-kills"),
        pytest.param(SLOW_KILLS, id=f"{SLOW_KILLS}-kills", marks=pytest.mark.slow),
    ],
)
def test_server_killed_mid_snapshot_loses_nothing_acknowledged(servers, kills):
    rng = random.Random(SEED)
    server = servers.module_server(__name__, launch_ahead)
    store_path = server.store
    figures = Figures()
    committed: list[Committed] = []
    # Stages in random order, each once per round, so that a few kills cover them all.
    order = [s for _ in range(-(-kills // len(STAGES))) for s in rng.sample(STAGES, len(STAGES))]
    try:
        with Store(store_path) as store:
            for k in range(kills):
                if k:
                    check_restores(server, committed, figures)
                # An acknowledged snapshot, taken before the kill.
                short = reference(server, random_tokens(SEED + 7 * k + 1,
                                                        prompt_length(rng, 300, 800)))
                name = f"acknowledged/{k}"
                done = pf(server, "snapshot", {"name": name, "token_ids": short.tokens})
                committed.append(Committed(name, done["cid"], short, acknowledged=True))
                # The long prompt's reference; then the prefix cache is emptied, so that the
                # snapshot computes the prompt again, in the same chunks.
                long = reference(server, random_tokens(SEED + 7 * k,
                                                       prompt_length(rng, 2000, 3500)))
                reset = post(server, "/reset_prefix_cache", None)
                assert reset.status_code == 200 and reset.json() == {"success": True}, reset.text
                name, tokens = f"long/{k}", long.tokens
                # Kill once the snapshot has pinned anything (its token ids, written first), once
                # the worker has saved a random number of its pages, or once it has saved all of
                # them: the commit follows within milliseconds, so that kill comes at once.
                stage, total = order[k], 2 * -(-len(tokens) // BLOCK)
                pages = {"pinned": 0, "pages": rng.randint(1, total - 1), "saved": total}[stage]
                delay = 0.0 if stage == "saved" else rng.uniform(0.0, 0.01)
                pins_before = set(store.list_pins())
                group = victims(server)
                request = SnapshotRequest(server, {"name": name, "token_ids": tokens})
                request.start()
                reached, seen = wait_for_stage(store, request, name, pages)
                time.sleep(delay)
                kill_process_group(server, group)
                request.join(120)
                assert not request.is_alive()
                figures.kills += 1
                figures.stages[stage] += 1

                cid = store.get_ref(name)
                if request.status == 200:
                    assert request.response is not None and request.response["cid"] == cid
                    figures.long_acknowledged += 1
                elif cid is not None:
                    figures.long_committed_unacknowledged += 1
                else:
                    figures.long_lost += 1
                if cid is not None:
                    committed.append(Committed(name, cid, long,
                                               acknowledged=request.status == 200))
                left = {n: len(i.digests) for n, i in store.list_pins().items()
                        if n not in pins_before and i is not None}
                print(f"kill {k}: stage {stage} (at {pages} of {total} pages) "
                      f"{'reached' if reached else 'not reached'}, {seen} seen, pins left {left}, "
                      f"{'committed' if cid else 'not committed'}, HTTP {request.status}")

                check_dead_store(store, committed)
                figures.fsck_clean += 1
                if k == kills - 1:
                    status = store.status()
                    figures.abandoned_pins = status.abandoned_pins
                    figures.abandoned_pin_bytes = status.abandoned_pin_bytes
                    figures.orphan_page_bytes = unnamed_bytes(store, "pages")
                    figures.job_records_left = len(store.meta_items("job:"))
                    stats = store.gc(prune="now")
                    figures.gc_removed_pins = stats.removed_pins
                    figures.gc_removed_page_bytes = stats.removed_page_bytes
                    assert stats.removed_snapshots == 0
                    assert store.list_pins() == {}
                    assert store.status().abandoned_pins == 0
                    figures.orphan_page_bytes_after = unnamed_bytes(store, "pages")
                    assert figures.orphan_page_bytes_after == 0
                    assert unnamed_bytes(store, "blobs") == 0
                    assert store.meta_items("job:") == {}  # records of the killed jobs, too
                    assert stats.removed_page_bytes == figures.orphan_page_bytes
                    check_dead_store(store, committed)
                server.restart()
            check_restores(server, committed, figures)
    finally:
        server.stop()
    print(f"seed {SEED}: {figures}")
    assert figures.kills == kills and figures.fsck_clean == kills
    assert figures.checkouts == figures.checkouts_identical
    # Every acknowledged snapshot was checked after every kill that followed it.
    assert sum(s.acknowledged for s in committed) >= kills
