"""A store client run as a separate process by the crash and concurrency tests.

    store_writer.py write STORE PREFIX ITERATIONS [SEED]   (ITERATIONS 0: until killed)
    store_writer.py gc STORE STOPFILE

`write` follows the writer protocol (pin pages and tokens, then commit the snapshot and drop the pin
in one transaction) and prints `cid <cid>` for every snapshot once it is committed, flushing each line.
It also abandons pages now and then and re-uses them later, which races with gc on purpose. `gc` runs
gc with no grace period and fsck in a loop until STOPFILE exists; it exits 1 if fsck finds anything.
"""

from __future__ import annotations

import os
import random
import sys
import time

from processfork.store import Manifest, MissingObject, SnapshotSequence, Store

PAGE = 32 * 1024
BLOCK = 16


def emit(*words: str) -> None:
    sys.stdout.write(" ".join(words) + "\n")
    sys.stdout.flush()


def write(path: str, prefix: str, iterations: int, seed: int) -> int:
    rng = random.Random(seed)
    store = Store(path)
    emit("ready")
    prev: list[bytes] = []
    abandoned: list[bytes] = []
    parent: str | None = store.get_ref(prefix)
    i = 0
    while iterations == 0 or i < iterations:
        pin = f"{prefix}-{os.getpid()}-{i}"
        pages = [rng.randbytes(PAGE) for _ in range(2)]
        pages += prev[:1] or [rng.randbytes(PAGE)]
        pages += [abandoned.pop(0)] if abandoned else [rng.randbytes(PAGE)]
        result = store.put_pages(pages, pin=pin)
        tokens = store.put_tokens(
            [rng.randrange(50_000) for _ in range(rng.randint(17, 32))], pin=pin
        )
        hexes = [d.hex() for d in result.digests]
        seq = SnapshotSequence(tokens, [(hexes[0], hexes[1]), (hexes[2], hexes[3])])
        manifest = Manifest(
            name=f"{prefix}/{i}",
            parents=[parent] if parent else [],
            fingerprint={"block_size": BLOCK, "writer": prefix},
            sequences=[seq],
        )
        parent = store.write_snapshot(
            manifest, ref=prefix, move_head=i % 4 == 0, message=f"step {i}", drop_pins=[pin]
        )
        emit("cid", parent)
        prev = pages
        if i % 3 == 1:
            orphan = rng.randbytes(PAGE)
            store.put_pages([orphan], pin=pin + "-abandon")
            store.drop_pin(pin + "-abandon")
            abandoned.append(orphan)
        if i % 5 == 2:
            for cid in store.fork(prefix, 2, prefix=f"{prefix}-f{i}"):
                emit("cid", cid)
        i += 1
    # One last abandoned page nobody re-uses: garbage that gc must find once the writers are done.
    store.put_pages([rng.randbytes(PAGE)], pin=f"{prefix}-last")
    store.drop_pin(f"{prefix}-last")
    store.close()
    return 0


def collect(path: str, stopfile: str, limit_s: float = 600.0) -> int:
    store = Store(path)
    emit("ready")
    runs = removed = 0
    deadline = time.monotonic() + limit_s  # never outlive a test that forgot to stop it
    while True:
        if time.monotonic() > deadline:
            emit("timeout")
            return 3
        stop = os.path.exists(stopfile)  # checked first: one full round runs after the writers end
        stats = store.gc(prune="now")
        runs += 1
        removed += stats.removed_pages
        issues = list(store.fsck())
        if issues:
            for issue in issues:
                emit("issue", issue.kind, issue.object, issue.message)
            return 1
        if stop:
            break
    emit("gc", str(runs), str(removed))
    store.close()
    return 0


def main(argv: list[str]) -> int:
    if argv[1] == "write":
        seed = int(argv[5]) if len(argv) > 5 else os.getpid()
        try:
            return write(argv[2], argv[3], int(argv[4]), seed)
        except MissingObject as exc:
            emit("lost", str(exc))
            return 2
    if argv[1] == "gc":
        return collect(argv[2], argv[3])
    raise SystemExit(f"unknown mode {argv[1]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
