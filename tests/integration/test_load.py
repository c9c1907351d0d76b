"""Many clients at once: completions, snapshots, forks, checkouts, ref deletes and gc.

Each client runs a seeded random mix for a fixed time and checks its own invariants after every
operation: every snapshot it got a 200 for is still there, under its ref, with the cid it was
told, until the client itself deletes the ref (gc runs all the while, with no grace period). The
test reports operations, errors, hangs and lost snapshots (all expected 0), and p50/p99 latency
per kind (printed and written to ``load-*.json`` under the test's tmp dir; never asserted: the
machine is shared). At the end, quiet: fsck is clean, every surviving snapshot checks out from
the store (every block evicted first), and a sample continues bit-identically to a warm
prefix-cache hit on the blocks the engine computed itself.

The default size is for CI; ``-m slow`` runs the larger one (docs/reliability.md).
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import model_server
from pf_http import PF, cached_tokens, complete, get, headers, pf, random_tokens
from processfork.store import Store

pytestmark = pytest.mark.integration

BLOCK = 32
HANG_SECONDS = 300.0  # a request that takes longer than this is a hang
SAMPLE = 3  # surviving snapshots whose restore is compared bit for bit with a warm hit
MAX_MODEL_LEN = 2048
# Weights of the operations each client draws (gc: one in ~25 operations over all clients).
MIX = {"complete": 30, "snapshot": 25, "fork": 8, "checkout": 20, "delete": 12, "gc": 4}


def split_point(length: int) -> int:
    return (length - 1) // BLOCK * BLOCK


def launch_ahead(servers):
    """A server with a store of its own (gc here runs with no grace period). 32 MiB of KV cache
    (16K tokens of the tiny model in fp32): a few filler prompts evict every block."""
    return servers.launch(extra_args=("--max-model-len", str(MAX_MODEL_LEN),
                                      "--max-num-batched-tokens", "512",
                                      "--kv-cache-memory-bytes", "32M",
                                      "--enforce-eager"))  # compared only with itself


@pytest.fixture(scope="module")
def server(servers):
    yield from model_server(servers, __name__, launch_ahead)


@dataclass
class Snap:
    name: str
    cid: str
    tokens: list[int]
    origin: str  # the snapshot whose tokens these are (itself, or a fork's parent)
    taken: float = field(default_factory=time.monotonic)


@dataclass
class Client:
    """One client: its random mix, the snapshots it was acknowledged, what went wrong."""

    index: int
    server: Any
    deadline: float
    rng: random.Random = field(init=False)
    own: dict[str, Snap] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    lost: set[str] = field(default_factory=set)
    loaded: set[str] = field(default_factory=set)  # origins this client has checked out
    counter: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(7000 + self.index)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        kinds, weights = list(MIX), list(MIX.values())
        http = httpx.Client(base_url=self.server.base_url, headers=headers(self.server),
                            timeout=HANG_SECONDS, trust_env=False)
        try:
            while time.monotonic() < self.deadline:
                kind = self.rng.choices(kinds, weights)[0]
                if kind in ("checkout", "delete") and not self.own or (
                    kind == "fork" and self.pick(originals=True) is None
                ):
                    kind = "snapshot"
                self.counter += 1
                t0 = time.perf_counter()
                try:
                    getattr(self, kind)(http)
                except httpx.TimeoutException as exc:
                    self.hangs.append(f"{kind}: {exc!r}")
                except Exception as exc:  # noqa: BLE001 - counted and reported, then asserted
                    self.errors.append(f"{kind}: {exc!r}"[:500])
                self.latencies[kind].append(time.perf_counter() - t0)
                try:
                    self.check()
                except Exception as exc:  # noqa: BLE001
                    self.errors.append(f"check: {exc!r}"[:500])
        finally:
            http.close()

    def _post(self, http: httpx.Client, op: str, body: dict[str, Any]) -> dict[str, Any]:
        response = http.post(f"{PF}/{op}" if not op.startswith("/") else op, json=body)
        if response.status_code != 200:
            raise AssertionError(f"{op} -> {response.status_code} {response.text[:300]}")
        return response.json()

    # -- operations ------------------------------------------------------------------------
    def complete(self, http: httpx.Client) -> None:
        tokens = random_tokens(self.seed(1), self.rng.randrange(50, 400))
        out = self._post(http, "/v1/completions", {
            "model": self.server.model_name, "prompt": tokens,
            "max_tokens": self.rng.randrange(4, 24), "temperature": 0})
        assert out["choices"][0]["finish_reason"] in ("length", "stop")

    def snapshot(self, http: httpx.Client) -> None:
        tokens = random_tokens(self.seed(2), self.rng.randrange(100, 700))
        name = f"load/c{self.index}/s{self.counter}"
        out = self._post(http, "snapshot", {"name": name, "token_ids": tokens})
        assert out["num_tokens"] == len(tokens) and out["name"] == name
        self.own[name] = Snap(name, out["cid"], tokens, name)

    def fork(self, http: httpx.Client) -> None:
        parent = self.pick(originals=True)
        assert parent is not None
        out = self._post(http, "fork", {"cid": parent.name, "n": 2,
                                        "name": f"{parent.name}/f{self.counter}"})
        for name, cid in zip(out["names"], out["cids"]):
            self.own[name] = Snap(name, cid, parent.tokens, parent.name)

    def checkout(self, http: httpx.Client) -> None:
        snap = self.pick()
        self.loaded.add(snap.origin)
        out = self._post(http, "checkout", {"cid": snap.name})
        assert out["cid"] == snap.cid, f"checkout of {snap.name} gave {out['cid']}"
        assert out["tokens_loaded"] + out["tokens_already_resident"] == split_point(
            len(snap.tokens))

    def delete(self, http: httpx.Client) -> None:
        snap = self.pick()
        response = http.delete(f"{PF}/refs/{snap.name}", params={"force": "true"})
        if response.status_code != 200:
            raise AssertionError(f"delete -> {response.status_code} {response.text[:300]}")
        assert response.json()["cid"] == snap.cid
        del self.own[snap.name]

    def gc(self, http: httpx.Client) -> None:
        with Store(self.server.store) as store:
            store.gc(prune="now", expire="now")

    # -- invariants ------------------------------------------------------------------------
    def check(self) -> None:
        """Every snapshot this client was acknowledged is there, with its cid, under its ref."""
        with Store(self.server.store, readonly=True) as store:
            for snap in self.own.values():
                if store.get_ref(snap.name) != snap.cid or not store.has_snapshot(snap.cid):
                    self.lost.add(snap.name)

    def pick(self, *, originals: bool = False) -> Snap | None:
        names = sorted(n for n in self.own if not originals or "/f" not in n.split("/", 2)[2])
        return self.own[self.rng.choice(names)] if names else None

    def seed(self, kind: int) -> int:
        return 10_000_000 * kind + 100_000 * self.index + self.counter


def evict_all(server) -> None:
    """Run prompts no snapshot shares until every block the engine held has been reused."""
    engine = get(server, f"{PF}/status").json()["engine"]
    need = (engine["num_blocks"] + 8) * BLOCK
    size = MAX_MODEL_LEN - BLOCK
    for i in range(-(-need // size)):
        complete(server, random_tokens(90_000_000 + i, size), max_tokens=1)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p99_ms": round(at(0.99) * 1000, 1), "max_ms": round(ordered[-1] * 1000, 1)}


def run_load(server, tmp_path: Path, *, clients: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    workers = [Client(i, server, deadline) for i in range(clients)]
    threads = [threading.Thread(target=c.run, name=f"load-{c.index}") for c in workers]
    keeper = Store(server.store)  # keeps the store open in this process while clients come and go
    try:
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 2 * HANG_SECONDS)
        wall = time.perf_counter() - t0
    finally:
        keeper.close()
    stuck = [t.name for t in threads if t.is_alive()]

    latencies: dict[str, list[float]] = defaultdict(list)
    for c in workers:
        for kind, values in c.latencies.items():
            latencies[kind].extend(values)
    survivors = [s for c in workers for s in c.own.values()]
    report: dict[str, Any] = {
        "clients": clients, "seconds": seconds, "wall_seconds": round(wall, 1),
        "operations": {k: len(v) for k, v in sorted(latencies.items())},
        "total_operations": sum(len(v) for v in latencies.values()),
        "errors": sum(len(c.errors) for c in workers),
        "hangs": sum(len(c.hangs) for c in workers) + len(stuck),
        "lost_snapshots": sum(len(c.lost) for c in workers),
        "surviving_snapshots": len(survivors),
        "latency": {k: percentiles(v) for k, v in sorted(latencies.items())},
        "first_errors": [e for c in workers for e in c.errors][:10],
    }

    # Quiet from here on. The store is whole.
    with Store(server.store, readonly=True) as store:
        issues = list(store.fsck())
        report["fsck_issues"] = len(issues)
        present = {s.name for s in survivors if store.get_ref(s.name) == s.cid}

    # Warm references from the blocks the engine computed itself: the newest snapshots whose
    # tokens no checkout ever loaded (completions use other tokens) and that are still resident.
    loaded = set().union(*(c.loaded for c in workers))
    candidates = sorted((s for s in survivors if s.origin == s.name and s.name not in loaded),
                        key=lambda s: s.taken, reverse=True)
    sample: list[tuple[Snap, dict[str, Any]]] = []
    for snap in candidates[: 4 * SAMPLE]:
        out = complete(server, snap.tokens, max_tokens=8, logprobs=5)
        if cached_tokens(out) == split_point(len(snap.tokens)):
            sample.append((snap, out))
        if len(sample) == SAMPLE:
            break

    evict_all(server)  # nothing resident: the checkouts below load from the store
    identical = 0
    for snap, warm in sample:
        out = pf(server, "checkout", {"cid": snap.name})
        assert out["tokens_loaded"] == split_point(len(snap.tokens))
        again = complete(server, snap.tokens, max_tokens=8, logprobs=5)
        a, b = again["choices"][0]["logprobs"], warm["choices"][0]["logprobs"]
        identical += all(a[k] == b[k] for k in ("tokens", "token_logprobs", "top_logprobs"))
    restored = 0
    for snap in survivors:
        out = pf(server, "checkout", {"cid": snap.name})
        restored += out["cid"] == snap.cid
    report.update({"restored": restored, "sample": len(sample),
                   "sample_bit_identical": identical})

    path = tmp_path / f"load-{clients}x{int(seconds)}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nload {clients} clients x {seconds:g} s: {json.dumps(report)}\n(written to {path})")

    assert report["errors"] == 0, report["first_errors"]
    assert report["hangs"] == 0, [h for c in workers for h in c.hangs] + stuck
    assert report["lost_snapshots"] == 0, sorted(n for c in workers for n in c.lost)
    assert issues == []
    assert present == {s.name for s in survivors}
    assert restored == len(survivors)
    assert len(sample) == SAMPLE and identical == SAMPLE


def test_load(server, tmp_path):
    run_load(server, tmp_path, clients=8, seconds=30)


@pytest.mark.slow
def test_load_slow(server, tmp_path):
    run_load(server, tmp_path, clients=16, seconds=120)
