"""What a remote must survive: concurrent pushers, damaged objects, a format it does not know,
and pushes killed with SIGKILL at random points."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
from processfork.store import Store
from processfork.store.remote import (
    CorruptRemoteObject,
    NonFastForward,
    RemoteFormatUnsupported,
    open_remote,
    parse_url,
)
from processfork.store.remote.fetch import fetch, tracking_ref, update_refs
from processfork.store.remote.gc import gc_remote
from processfork.store.remote.push import push
from remote_helpers import content, make_snapshot

HERE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def _s3():
    """A plain S3 client of the test server (the AWS environment points at it)."""
    return boto3.session.Session().client("s3")


def _clone(url: str, path: Path) -> Store:
    store = Store(path)
    result = fetch(store.env, open_remote(url, env=store.env), remote_name="origin")
    update_refs(store.env, result.refs, message="clone")
    return store


def test_two_concurrent_pushes_to_one_ref_exactly_one_wins(tmp_path: Path, remote_url: str) -> None:
    with Store(tmp_path / "a") as a:
        base = make_snapshot(a, "main")
        push(a.env, open_remote(remote_url, env=a.env), {"main": base})
    stores = []
    for name in ("b", "c"):
        store = _clone(remote_url, tmp_path / name)
        stores.append((store, make_snapshot(store, "main", parents=[base], tokens=range(48))))
    barrier = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def run(i: int) -> None:
        store, cid = stores[i]
        remote = open_remote(remote_url, env=store.env)
        barrier.wait()
        try:
            outcomes[i] = push(store.env, remote, {"main": cid}).refs[0].status
        except NonFastForward as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = [i for i, o in enumerate(outcomes) if o == "fast-forward"]
    assert len(wins) == 1, outcomes
    assert isinstance(outcomes[1 - wins[0]], NonFastForward)
    winner = stores[wins[0]][1]
    assert open_remote(remote_url).read_ref("main").cid == winner
    with _clone(remote_url, tmp_path / "d") as d:
        assert d.list_refs()["main"] == winner and list(d.fsck()) == []
    for store, _ in stores:
        store.close()


def _damage_first_page(url: str) -> str:
    """Flip one byte of the first page of the remote's only pack (rewritten in place, as damage
    at rest would be); returns the page's digest."""
    remote = open_remote(url)
    (index,) = remote.load_indexes().values()
    entry = next(e for e in index.entries if e.kind == "p")
    loc = parse_url(url)
    key = loc.key(f"packs/{index.name}.pack")
    body = bytearray(_s3().get_object(Bucket=loc.bucket, Key=key)["Body"].read())
    body[entry.offset + 5] ^= 0xFF
    _s3().put_object(Bucket=loc.bucket, Key=key, Body=bytes(body))
    return entry.key


def test_a_corrupt_object_on_the_remote_is_caught_and_nothing_is_stored(
    tmp_path: Path, remote_url: str
) -> None:
    with Store(tmp_path / "a") as a:
        cid = make_snapshot(a, "main", tokens=range(100))
        push(a.env, open_remote(remote_url, env=a.env), {"main": cid})
    digest = _damage_first_page(remote_url)
    with Store(tmp_path / "b") as b:
        with pytest.raises(CorruptRemoteObject, match=digest):
            fetch(b.env, open_remote(remote_url, env=b.env), remote_name="origin")
        assert not b.has_snapshot(cid)
        assert tracking_ref("origin", "main") not in b.list_refs()
        assert b.list_pins() == {}
        assert list(b.fsck()) == []


def test_keys_under_refs_that_are_no_ref_names_are_ignored(tmp_path: Path, remote_url: str) -> None:
    with Store(tmp_path / "a") as a:
        cid = make_snapshot(a, "main")
        push(a.env, open_remote(remote_url, env=a.env), {"main": cid})
    loc = parse_url(remote_url)
    for bad in ("refs/a..b", "refs/x/", "refs/HEAD.lock", "refs/-opt"):
        _s3().put_object(Bucket=loc.bucket, Key=loc.key(bad), Body=cid.encode() + b"\n")
    with _clone(remote_url, tmp_path / "b") as b:
        assert b.list_refs() == {"main": cid, tracking_ref("origin", "main"): cid}


def test_a_remote_of_an_unknown_format_is_never_written(tmp_path: Path, remote_url: str) -> None:
    loc = parse_url(remote_url)
    record = json.dumps({"format": "processfork-remote", "version": 2}).encode()
    _s3().put_object(Bucket=loc.bucket, Key=loc.key("pf-remote.json"), Body=record)
    with Store(tmp_path / "a") as a:
        cid = make_snapshot(a, "main")
        with pytest.raises(RemoteFormatUnsupported, match="version 2"):
            push(a.env, open_remote(remote_url, env=a.env), {"main": cid})
        listed = _s3().list_objects_v2(Bucket=loc.bucket, Prefix=loc.key(""))["Contents"]
        assert [o["Key"] for o in listed] == [loc.key("pf-remote.json")]


PUSHER = """
import sys
from processfork.store import Store
from processfork.store.remote import open_remote
from processfork.store.remote.push import push
store = Store(sys.argv[1])
remote = open_remote(sys.argv[2], env=store.env, parallelism=2)
print("pushing", flush=True)
push(store.env, remote, {"main": store.resolve("main")}, pack_size=int(sys.argv[3]))
"""


def _indexes(url: str) -> int:
    loc = parse_url(url)
    reply = _s3().list_objects_v2(Bucket=loc.bucket, Prefix=loc.key("packs/"))
    return sum(o["Key"].endswith(".idx") for o in reply.get("Contents", []))


def _keys(url: str, folder: str) -> set[str]:
    loc = parse_url(url)
    reply = _s3().list_objects_v2(Bucket=loc.bucket, Prefix=loc.key(folder))
    return {o["Key"] for o in reply.get("Contents", [])}


def test_remote_gc_removes_what_no_ref_reaches_after_the_grace_period(
    tmp_path: Path, remote_url: str
) -> None:
    with Store(tmp_path / "a") as a:
        old = make_snapshot(a, "main", tokens=range(64))
        push(a.env, open_remote(remote_url, env=a.env), {"main": old})
        old_packs = _keys(remote_url, "packs/")
        new = make_snapshot(a, "other", tokens=range(96))
        push(a.env, open_remote(remote_url, env=a.env), {"main": new}, force=True)
    kept = gc_remote(open_remote(remote_url))  # default grace: a day
    assert kept.removed_packs == 0 and kept.kept_young == 1
    assert gc_remote(open_remote(remote_url), grace=0, dry_run=True).removed_packs == 1
    assert _keys(remote_url, "packs/") >= old_packs
    stats = gc_remote(open_remote(remote_url), grace=0)
    assert stats.removed_packs == 1 and stats.kept_packs == 1
    assert not (_keys(remote_url, "packs/") & old_packs)
    with _clone(remote_url, tmp_path / "b") as b:
        assert b.list_refs()["main"] == new and list(b.fsck()) == []


def _remote_main(url: str, path: Path) -> str | None:
    """Clone the remote into a fresh store: every ref's snapshots whole, fsck clean."""
    with _clone(url, path) as store:
        assert list(store.fsck()) == []
        return store.list_refs().get("main")


# Pushes killed in the default run, and in `make test-slow`.
CI_TRIALS = 4
SLOW_TRIALS = 10


@pytest.mark.parametrize(
    "trials",
    [pytest.param(CI_TRIALS, id=f"{CI_TRIALS}-trials"),
     pytest.param(SLOW_TRIALS, id=f"{SLOW_TRIALS}-trials", marks=pytest.mark.slow)],
)
def test_a_push_killed_at_random_points_leaves_the_remote_consistent(
    tmp_path: Path, remote_url: str, trials: int
) -> None:
    """Each trial pushes a new snapshot on top of the last and is killed with SIGKILL once the
    remote shows a random number of its packs (0 to 7 of about 10). After each kill a fresh
    clone is whole, its `main` the last completed push; a final push completes; remote gc then
    removes what the killed pushes left and nothing a ref reaches. A push may finish before its
    kill: at most 2 trials may go without one."""
    rng = random.Random(11)
    with Store(tmp_path / "a") as a:
        pushed = make_snapshot(a, "main", tokens=range(160), page_size=64 << 10)
        push(a.env, open_remote(remote_url, env=a.env), {"main": pushed})
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
    args = [sys.executable, "-c", PUSHER, str(tmp_path / "a"), remote_url, str(256 << 10)]
    head = pushed
    kills = 0
    for trial in range(trials):
        with Store(tmp_path / "a") as a:
            # 20 blocks of fresh pages, 2.5 MiB: about 10 packs
            head = make_snapshot(a, "main", parents=[head], tokens=range(320), page_size=64 << 10)
        before, target = _indexes(remote_url), rng.randrange(8)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, start_new_session=True)
        assert proc.stdout.readline() == b"pushing\n"
        while proc.poll() is None and _indexes(remote_url) - before < target:
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        found = _remote_main(remote_url, tmp_path / f"check{trial}")
        # The ref names the last push that moved it: this one if the kill came after its move.
        assert found in (pushed, head) and (proc.returncode != 0 or found == head)
        pushed = found
    assert kills >= trials - 2
    done = subprocess.run(args, env=env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    gc_remote(open_remote(remote_url), grace=0)  # packs a kill left without their index
    assert not [k for k in _keys(remote_url, "packs/") if k.endswith(".pack")
                and k[: -len(".pack")] + ".idx" not in _keys(remote_url, "packs/")]
    with _clone(remote_url, tmp_path / "final") as final, Store(tmp_path / "a") as a:
        assert final.list_refs()["main"] == head
        assert content(final, head) == content(a, head)
        assert list(final.fsck()) == []


# A pull that stops once its pages are committed (not yet durable: see Env.write) and before the
# transaction that makes them durable and writes the manifests and refs.
STALLED_PULLER = """
import sys, time
from processfork.store import Store
from processfork.store.remote import fetch as fetch_module, open_remote

def stall(*args, **kwargs):
    print("pages committed", flush=True)
    time.sleep(600)

fetch_module._commit = stall
store = Store(sys.argv[1])
fetch_module.fetch(store.env, open_remote(sys.argv[2], env=store.env), remote_name="origin")
"""


def test_a_pull_killed_after_its_page_commits_leaves_the_store_as_it_was(
    tmp_path: Path, remote_url: str
) -> None:
    """SIGKILL after every page of a pull is committed, before the durable commit that names
    them: the earlier snapshot is whole, no ref or manifest names the new one, the killed pull's
    pin holds its pages until gc drops it (its owner is dead) and reclaims them; a pull then
    completes."""
    with Store(tmp_path / "a") as a:
        old = make_snapshot(a, "main", tokens=range(64), page_size=64 << 10)
        push(a.env, open_remote(remote_url, env=a.env), {"main": old})
    with _clone(remote_url, tmp_path / "b") as b:
        before = content(b, old)
    with Store(tmp_path / "a") as a:
        new = make_snapshot(a, "main", parents=[old], tokens=range(320), page_size=64 << 10)
        push(a.env, open_remote(remote_url, env=a.env), {"main": new})
        expected = content(a, new)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", STALLED_PULLER, str(tmp_path / "b"), remote_url],
                            env=env, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline() == b"pages committed\n"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with Store(tmp_path / "b") as b:
        assert not b.has_snapshot(new)
        assert b.get_ref(tracking_ref("origin", "main")) == old
        assert content(b, old) == before
        assert list(b.fsck()) == []
        pins = b.list_pins()
        assert len(pins) == 1
        (pin,) = pins.values()
        assert pin is not None and pin.owner_dead()
        # The new snapshot's token array and page table, then the pages of its 20 new blocks
        pages = [d for d, held in zip(pin.digests, b.has_pages(pin.digests)) if held]
        assert len(pages) == 2 * 20
        assert all(b.has_blob(d) for d in pin.digests if d not in pages)
        assert len(pin.digests) == len(pages) + 2
        stats = b.gc(prune=0)
        assert stats.removed_pins == 1 and stats.removed_pages == len(pages)
        result = fetch(b.env, open_remote(remote_url, env=b.env), remote_name="origin")
        update_refs(b.env, result.refs, message="pull")
        assert b.get_ref("main") == new and content(b, new) == expected
        assert content(b, old) == before and list(b.fsck()) == []
