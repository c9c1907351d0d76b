"""Store benchmark: every number is a ratio against a baseline measured side by side in the same run.

    .venv/bin/python bench/store_bench.py [--quick] [--dir DIR] [--markdown]

Rows:
- page write path: `put_pages` (xxh3-128 hash + put + journal, one transaction, durable commit) against
  a bare LMDB put loop of the same bytes under the same environment settings (keys precomputed).
- read path: `read_pages_into` a preallocated buffer against one numpy memcpy of the same bytes
  (64 MiB; best of N interleaved runs, since this row is CPU-bound and the others are disk-bound).
- `fork -n 12`: wall time, and store growth per child (sum of the sizes of the records it adds;
  LMDB page growth is shown alongside for reference).
- gc over 100,000 pages and 1,000 snapshots, a fifth of them unreachable.
Each timing is the median of several repetitions; baselines and ours alternate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import lmdb
import numpy as np
from lmdb_baseline import bare_put_seconds
from processfork.store import Manifest, SnapshotSequence, Store, page_digest
from processfork.store.env import DB_NAMES
from rich.console import Console
from rich.table import Table

MiB = 1 << 20
FINGERPRINT = {
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "model_config_sha256": "9c1e3f0b5b6f4b07a1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192",
    "vllm_version": "0.32.0",
    "attention_backend": "CPU_ATTN",
    "isa": "vec",
    "block_size": 16,
    "kv_dtype": "float32",
    "num_layers": 32,
    "num_kv_heads": 8,
    "head_dim": 128,
    "block_layout": "cpu:[heads, block, 2*head_dim], K transposed",
    "tp_size": 1,
    "tp_rank": 0,
    "batch_invariant": False,
    "threads": 2,
}


@dataclass
class Row:
    measure: str
    ours: str
    baseline: str
    value: float
    shown: str
    target: str
    ok: bool


def check(ok: bool, what: str) -> None:
    """The benchmark also checks its results: a fast wrong answer must not print a ratio."""
    if not ok:
        raise SystemExit(f"benchmark self-check failed: {what}")


def median_time(fn: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fresh_dir(root: str) -> str:
    return tempfile.mkdtemp(dir=root)


# -- write path -------------------------------------------------------------------------------
def bench_write(root: str, page_size: int, total: int, repeat: int) -> Row:
    n = max(4, total // page_size)
    pages = [np.frombuffer(os.urandom(page_size), dtype=np.uint8) for _ in range(n)]
    keys = [page_digest(p) for p in pages]

    def ours() -> float:
        d = fresh_dir(root)
        with Store(d) as store:
            t = time.perf_counter()
            result = store.put_pages(pages)
            elapsed = time.perf_counter() - t
            check(result.bytes_written == n * page_size, "result.bytes_written == n * page_size")
        shutil.rmtree(d)
        return elapsed

    def bare() -> float:
        return bare_put_seconds(keys, pages, root)

    ours(), bare()  # warm-up: allocator, page cache
    t_ours, t_bare = [], []
    for _ in range(repeat):
        t_bare.append(bare())
        t_ours.append(ours())
    mine, base = statistics.median(t_ours), statistics.median(t_bare)
    mb = n * page_size / MiB
    ratio = base / mine
    return Row(
        f"write {n} x {page_size // 1024} KiB pages (put_pages vs bare LMDB put)",
        f"{mb / mine:,.0f} MiB/s",
        f"{mb / base:,.0f} MiB/s",
        ratio,
        f"{ratio:.2f}",
        ">= 0.5",
        ratio >= 0.5,
    )


# -- read path --------------------------------------------------------------------------------
def bench_read(root: str, page_size: int, total: int, repeat: int) -> list[Row]:
    n = max(4, total // page_size)
    src = np.frombuffer(os.urandom(n * page_size), dtype=np.uint8)
    d = fresh_dir(root)
    rows = []
    with Store(d) as store:
        digests = store.put_pages(
            [src[i * page_size : (i + 1) * page_size] for i in range(n)]
        ).digests
        out = np.empty(n * page_size, dtype=np.uint8)
        for verify in (True, False):
            store.read_pages_into(digests, out, page_size, verify=verify)  # warm the mapping
            check(np.array_equal(out, src), "np.array_equal(out, src)")
            t_ours, t_copy = [], []
            for _ in range(repeat):  # CPU-bound: best of N, interleaved, is the stable statistic
                t_copy.append(median_time(lambda: np.copyto(out, src), 1))
                t_ours.append(
                    median_time(
                        lambda v=verify: store.read_pages_into(digests, out, page_size, verify=v), 1
                    )
                )
            mine, base = min(t_ours), min(t_copy)
            mb = n * page_size / MiB
            ratio = base / mine
            rows.append(
                Row(
                    f"read {n} x {page_size // 1024} KiB pages, verify={verify} "
                    "(read_pages_into vs numpy memcpy)",
                    f"{mb / mine:,.0f} MiB/s",
                    f"{mb / base:,.0f} MiB/s",
                    ratio,
                    f"{ratio:.2f}",
                    ">= 0.5",
                    ratio >= 0.5,
                )
            )
    shutil.rmtree(d)
    return rows


# -- fork -------------------------------------------------------------------------------------
def used_bytes(store: Store) -> int:
    """Bytes of LMDB pages in use by all databases (branch + leaf + overflow), not free pages."""
    env = store.env.env
    psize = env.stat()["psize"]

    def run(txn: lmdb.Transaction) -> int:
        pages = 0
        for name in DB_NAMES:
            s = txn.stat(store.dbs[name])
            pages += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
        return pages

    return store._read(run) * psize


def record_bytes(store: Store) -> int:
    """Sum of key + value sizes of every record in the small databases a fork writes to."""

    def run(txn: lmdb.Transaction) -> int:
        total = 0
        for name in ("snapshots", "refs", "reflog", "journal", "blobs"):
            for k, v in txn.cursor(db=store.dbs[name]):
                total += len(k) + len(v)
        return total

    return store._read(run, buffers=True)


def bench_fork(root: str, tokens: int, repeat: int) -> list[Row]:
    d = fresh_dir(root)
    rows = []
    with Store(d) as store:
        blocks = -(-tokens // 16)
        pages = store.put_pages([os.urandom(4096) for _ in range(2 * blocks)]).digests
        hexes = [p.hex() for p in pages]
        ref = store.put_tokens(list(range(tokens)))
        seq = SnapshotSequence(ref, [(hexes[i], hexes[i + 1]) for i in range(0, len(hexes), 2)])
        m = Manifest(name="base", fingerprint=FINGERPRINT, sequences=[seq])
        store.write_snapshot(m, ref="base")
        store.fork("base", 12, prefix="warmup")
        times, growth_rec, growth_pages = [], [], []
        for r in range(repeat):
            rec0, used0 = record_bytes(store), used_bytes(store)
            t = time.perf_counter()
            kids = store.fork("base", 12, prefix=f"try{r}")
            times.append(time.perf_counter() - t)
            check(len(kids) == 12, "len(kids) == 12")
            growth_rec.append((record_bytes(store) - rec0) / 12)
            growth_pages.append((used_bytes(store) - used0) / 12)
        ms = statistics.median(times) * 1000
        per_child = statistics.median(growth_rec)
        per_child_pages = statistics.median(growth_pages)
        rows.append(
            Row(
                f"fork -n 12 of a {tokens}-token snapshot ({blocks} blocks), total time",
                f"{ms:.2f} ms",
                "-",
                ms,
                f"{ms:.2f} ms",
                "<= 10 ms",
                ms <= 10,
            )
        )
        rows.append(
            Row(
                "fork: store growth per child (sum of key+value sizes of added records)",
                f"{per_child:,.0f} B",
                f"manifest {len(store.get_snapshot(kids[0]).canonical_bytes())} B",
                per_child,
                f"{per_child / 1024:.2f} KiB",
                "<= 2 KiB",
                per_child <= 2048,
            )
        )
        rows.append(
            Row(
                "fork: LMDB pages in use, growth per child (reference)",
                f"{per_child_pages:,.0f} B",
                "-",
                per_child_pages,
                f"{per_child_pages / 1024:.2f} KiB",
                "-",
                True,
            )
        )
    shutil.rmtree(d)
    return rows


# -- gc ---------------------------------------------------------------------------------------
def build_gc_store(path: str, num_pages: int, num_snapshots: int) -> None:
    per_snap = num_pages // num_snapshots
    blocks = per_snap // 2
    branches = 10
    with Store(path) as store:
        tokens = store.put_tokens(list(range(blocks * 16)))
        parents: dict[int, str] = {}
        for s in range(num_snapshots):
            b = s % branches
            digests = store.put_pages([os.urandom(512) for _ in range(per_snap)]).digests
            hexes = [x.hex() for x in digests]
            seq = SnapshotSequence(tokens, [(hexes[i], hexes[i + 1]) for i in range(0, len(hexes), 2)])
            m = Manifest(
                name=f"b{b}/{s}",
                parents=[parents[b]] if b in parents else [],
                fingerprint=FINGERPRINT,
                sequences=[seq],
            )
            parents[b] = store.write_snapshot(m, ref=f"branch{b}", move_head=False)
        for b in range(branches // 5):  # a fifth of the history becomes unreachable
            store.delete_ref(f"branch{b}")


def bench_gc(root: str, num_pages: int, num_snapshots: int) -> list[Row]:
    d = fresh_dir(root)
    build_gc_store(d, num_pages, num_snapshots)
    with Store(d) as store:
        dry = store.gc(dry_run=True, prune="now", expire="now")
        real = store.gc(prune="now", expire="now")
        check(
            (dry.removed_pages, dry.removed_snapshots)
            == (real.removed_pages, real.removed_snapshots),
            "the dry run plans what the real run removes",
        )
    shutil.rmtree(d)
    rows = []
    for label, stats in (("gc --dry-run", dry), ("gc", real)):
        rows.append(
            Row(
                f"{label} over {num_pages:,} pages, {num_snapshots:,} snapshots "
                f"(removes {stats.removed_pages:,} pages, {stats.removed_snapshots} snapshots)",
                f"{stats.seconds:.2f} s",
                "-",
                stats.seconds,
                f"{stats.seconds:.2f} s",
                "<= 2 s",
                stats.seconds <= 2.0,
            )
        )
    return rows


# -- output -----------------------------------------------------------------------------------
def render(rows: list[Row], markdown: bool) -> None:
    if markdown:
        print("| Measure | Ours | Baseline | Ratio / value | Target | Result |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            result = "-" if r.target == "-" else ("PASS" if r.ok else "MISS")
            print(f"| {r.measure} | {r.ours} | {r.baseline} | {r.shown} | {r.target} | {result} |")
        return
    table = Table(title="processfork store benchmark (ratios measured side by side)")
    for col in ("Measure", "Ours", "Baseline", "Ratio / value", "Target", "Result"):
        table.add_column(col, justify="left" if col == "Measure" else "right")
    for r in rows:
        result = "-" if r.target == "-" else ("[green]PASS" if r.ok else "[red]MISS")
        table.add_row(r.measure, r.ours, r.baseline, r.shown, r.target, result)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    parser.add_argument(
        "--dir", default=None, help="where to create scratch stores (default .bench/)"
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    root = args.dir or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".bench"
    )
    os.makedirs(root, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=root, prefix="store-bench-")
    write_total = (32 if args.quick else 64) * MiB
    repeat = 3 if args.quick else 5
    rows: list[Row] = []
    try:
        for size in (32 * 1024, MiB):
            rows.append(bench_write(scratch, size, write_total, repeat))
        for size in (32 * 1024, MiB):
            rows += bench_read(scratch, size, 64 * MiB, 3 * repeat)
        rows += bench_fork(scratch, 4096, repeat * 2)
        if args.quick:
            rows += bench_gc(scratch, 20_000, 200)
        else:
            rows += bench_gc(scratch, 100_000, 1_000)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    render(rows, args.markdown)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
