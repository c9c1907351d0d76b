"""Snapshots: storage of an agent session, throughput of a full snapshot, cost of an incremental one.

    .venv/bin/python bench/snapshot_bench.py [--quick] [--markdown]

One server with our connector (bench model; ``--quick``: the tiny model and shorter contexts).

1. **Agent session storage.** A 16K-token context, then 10 turns that each append 512 tokens and
   snapshot under the same ref, so each snapshot's parent is the previous one. Stored by us: the
   store's growth (LMDB pages in use, everything included: pages, page tables, token blobs,
   manifests, refs, reflog) next to the sum of the snapshots' ``bytes_written``. Compared with a
   per-prompt store like ExampleConnector, which keeps the full KV of each of the 11 states, and
   with the unique KV bytes (the KV of the final sequence).
2. **Snapshot of a resident 16K-token context.** The context is computed by an ordinary
   completion first; the snapshot is then timed client-side. Baseline: a bare LMDB write of the
   same pages (same count, same size, precomputed keys, one transaction, durable commit, the
   store's environment settings), measured in the same run, alternating with ours.
3. **Incremental snapshot.** The same context plus one new block of 32 tokens (made resident by
   a completion), snapshotted under the same ref: its time as a share of the full snapshot's,
   and the number of new pages (exactly one block).

Raw numbers: ``.bench/snapshot.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH_DIR,
    PF,
    MiB,
    Server,
    Target,
    check,
    console,
    fresh_dir,
    kv_bytes_per_token,
    median,
    model_path,
    ms,
    targets_markdown,
    targets_table,
    tokens,
    write_json,
)
from lmdb_baseline import bare_put_seconds
from processfork.store import page_digest

BLOCK = 32


def store_bytes(srv: Server) -> tuple[int, int]:
    """(LMDB bytes in use, sum of stored page bytes) from the server's status route."""
    st = srv.status()["store"]
    return int(st["size_bytes"]), int(st["page_bytes"])


def session(srv: Server, context: int, turns: int, turn_tokens: int, kvpt: int) -> dict:
    seq = tokens(1, context)
    used0, pages0 = store_bytes(srv)
    snaps = []
    parent = None
    for i in range(turns + 1):
        if i:
            seq = seq + tokens(100 + i, turn_tokens)
        t, snap = srv.timed(f"{PF}/snapshot", {"name": "session", "token_ids": seq})
        check(snap["parents"] == ([parent] if parent else []), f"turn {i}: parent chain broken")
        parent = snap["cid"]
        snaps.append({"seconds": t, "tokens": len(seq), **snap})
    used1, pages1 = store_bytes(srv)
    per_prompt = sum(s["tokens"] for s in snaps) * kvpt
    unique = len(seq) * kvpt
    return {
        "snapshots": snaps,
        "store_growth_bytes": used1 - used0,
        "page_bytes_growth": pages1 - pages0,
        "bytes_written": sum(s["bytes_written"] for s in snaps),
        "per_prompt_bytes": per_prompt,
        "unique_bytes": unique,
    }


def bare_lmdb_write(page_size: int, count: int, root: Path) -> float:
    """A txn.put loop of ``count`` random pages under precomputed keys, one durable commit."""
    pages = [os.urandom(page_size) for _ in range(count)]
    keys = [page_digest(p) for p in pages]
    return bare_put_seconds(keys, pages, str(root))


def throughput(srv: Server, context: int, reps: int, page_size: int, root: Path) -> dict:
    """Full snapshots of resident contexts and incremental ones on top, with bare-LMDB baselines."""
    out: dict = {"full": [], "incremental": [], "bare": []}
    blocks = -(-context // BLOCK)
    out["bare"].append(bare_lmdb_write(page_size, 2 * blocks, root))
    for r in range(reps):
        ctx = tokens(1000 + r, context)
        srv.complete(ctx)  # the context becomes resident, as after an agent's turn
        t, snap = srv.timed(f"{PF}/snapshot", {"name": f"resident-{r}", "token_ids": ctx})
        check(snap["new_pages"] == blocks, f"full snapshot wrote {snap['new_pages']} of {blocks}")
        out["full"].append({"seconds": t, **snap})
        out["bare"].append(bare_lmdb_write(page_size, 2 * blocks, root))
        grown = ctx + tokens(2000 + r, BLOCK)
        srv.complete(grown)  # one more block becomes resident
        t, inc = srv.timed(f"{PF}/snapshot", {"name": f"resident-{r}", "token_ids": grown})
        check(inc["parents"] == [snap["cid"]], "incremental snapshot has the wrong parent")
        out["incremental"].append({"seconds": t, **inc})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, shorter contexts")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument("--reps", type=int, default=2, help="full + incremental repetitions")
    opts = parser.parse_args()

    preset = "tiny" if opts.quick else "bench"
    context, turns, turn_tokens = (4096, 10, 256) if opts.quick else (16384, 10, 512)
    model = model_path(preset)
    kvpt = kv_bytes_per_token(preset)
    page_size = kvpt * BLOCK // 2
    max_len = context + turns * turn_tokens + 2 * BLOCK
    args = ["--dtype", "float32", "--max-model-len", str(max_len + 64)]
    root = fresh_dir(BENCH_DIR / "snapshot")
    store = fresh_dir(root / "store")
    with Server("snapshot-pf", model, "pf", store, args) as srv:
        srv.complete(tokens(900, 64))
        sess = session(srv, context, turns, turn_tokens, kvpt)
        thr = throughput(srv, context, opts.reps, page_size, root)
        threads = srv.threads()

    targets: list[Target] = []
    ours = sess["store_growth_bytes"]
    unique = sess["unique_bytes"]
    per_prompt = sess["per_prompt_bytes"]
    label = f"{context // 1024}K context + {turns} turns of {turn_tokens} tokens"
    targets += [
        Target(f"session storage, {label}: store growth vs unique KV", f"{ours / MiB:,.1f} MiB",
               f"{unique / MiB:,.1f} MiB", f"{ours / unique:.3f}", "<= 1.05",
               ours <= 1.05 * unique),
        Target("session: page bytes written (sum of bytes_written) vs unique KV",
               f"{sess['bytes_written'] / MiB:,.1f} MiB", f"{unique / MiB:,.1f} MiB",
               f"{sess['bytes_written'] / unique:.3f}", "-", None),
        Target("session: per-prompt store (full KV of each of the 11 states) vs unique KV",
               f"{per_prompt / MiB:,.1f} MiB", f"{unique / MiB:,.1f} MiB",
               f"{per_prompt / unique:.2f}", "-", None),
        Target("session: ours vs per-prompt store", f"{ours / MiB:,.1f} MiB",
               f"{per_prompt / MiB:,.1f} MiB", f"{ours / per_prompt:.3f}", "-", None),
    ]
    full = median(s["seconds"] for s in thr["full"])
    nbytes = median(s["bytes_written"] for s in thr["full"])
    bare = median(thr["bare"])
    incr = median(s["seconds"] for s in thr["incremental"])
    new_pages = [s["new_pages"] for s in thr["incremental"]]
    targets += [
        Target(f"snapshot of a resident {context // 1024}K context vs bare LMDB write "
               f"({nbytes / MiB:,.0f} MiB)", f"{nbytes / MiB / full:,.0f} MiB/s",
               f"{nbytes / MiB / bare:,.0f} MiB/s", f"{bare / full:.2f}", ">= 0.50",
               bare / full >= 0.5),
        Target("incremental snapshot (+1 block) vs full snapshot time", ms(incr), ms(full),
               f"{incr / full:.3f}", "<= 0.05", incr <= 0.05 * full),
        Target("incremental snapshot: new pages (blocks) written", str(new_pages), "1",
               str(max(new_pages)), "== 1", all(n == 1 for n in new_pages)),
    ]
    console.print(targets_table(f"Snapshots, {preset} model, worker threads {threads}", targets))
    if opts.markdown:
        print(targets_markdown(targets))
    write_json("snapshot", {"preset": preset, "kv_bytes_per_token": kvpt, "threads": threads,
                            "session": sess, "throughput": thr, "targets": targets})
    # Quick runs use the tiny model, whose KV is too small for memory-bandwidth ratios to mean
    # much: they check that everything works and print the ratios, but never fail on them.
    return 0 if opts.quick or all(t.ok is not False for t in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
