"""Replica benchmark: time to first token on replica B of a context replica A stored, fetched
from a remote by B's checkout, against B recomputing a context of the same length cold.

    .venv/bin/python bench/replica_bench.py [--quick] [--reps N]

Replica A (the bench model, fp32) snapshots a 16K-token context and pushes its store to a
SeaweedFS remote on this machine, then stops. Replica B starts on an empty store with that remote
(`pf serve --remote`) and measures, one at a time:

- (a) cold recompute: a completion of a fresh 16K-token prompt (max_tokens=1);
- (b) fetch + restore: `POST /checkout` of A's ref, which fetches the snapshot from the remote
  (384 MiB of pages, verified, written to B's store) and loads it, then the completion of A's
  prompt; the first repetition fetches, the others find the pages local (B's prefix cache is
  reset before each);
- (c) restore alone: the same after the first fetch.
`--quick`: the tiny model and 4K tokens.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from harness import BENCH_DIR, Server, first_token, fresh_dir, model_path, ms, tokens
from processfork.store import Store
from processfork.store.remote import open_remote
from processfork.store.remote.push import push
from rich.console import Console
from rich.table import Table

from processfork_dev.s3_server import BUCKET, start_s3_server

PF = "/v1/processfork"
BLOCK = 32


def server_args(max_len: int) -> list[str]:
    return ["--dtype", "float32", "--max-model-len", str(max_len + 64),
            "--max-num-batched-tokens", str(max_len), "--enable-prompt-tokens-details"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    opts = ap.parse_args()
    preset, length = ("tiny", 4096) if opts.quick else ("bench", 16384)
    model = model_path(preset)
    args = server_args(length)
    prompt = tokens(length, length)
    work = Path(tempfile.mkdtemp(prefix="pf-replica-bench-"))
    s3 = start_s3_server(work / "s3")
    os.environ.update(s3.env())  # both replicas inherit the endpoint and the credentials
    url = f"s3://{BUCKET}/replicas"
    console = Console()
    try:
        store_a = fresh_dir(BENCH_DIR / "replica" / "a")
        with Server("replica-a", model, "pf", store_a, args) as a:
            a.complete(prompt)
            cid = a.post(f"{PF}/snapshot", {"name": "ctx", "token_ids": prompt})["cid"]
            _, warm = a.complete(prompt)
        with Store(store_a) as st:
            pushed = push(st.env, open_remote(url, env=st.env), {"ctx": cid})
        store_b = fresh_dir(BENCH_DIR / "replica" / "b")
        cold, fetch_restore, restore = [], [], []
        with Server("replica-b", model, "pf", store_b, args,
                    connector_extra={"remote": url}) as b:
            for i in range(2):
                b.complete(tokens(910 + i, 64))  # first requests after a start pay one-time costs
            t, _ = b.complete(tokens(7000, length))
            cold.append(t)
            for r in range(opts.reps):
                b.reset_prefix_cache()
                t1, out = b.timed(f"{PF}/checkout", {"cid": "ctx"})
                t2, comp = b.complete(prompt)
                if first_token(comp) != first_token(warm):
                    raise SystemExit("replica B's first token differs from replica A's warm hit")
                if out["tokens_loaded"] != (length - 1) // BLOCK * BLOCK:
                    raise SystemExit(f"checkout loaded {out['tokens_loaded']} tokens")
                (fetch_restore if r == 0 else restore).append(t1 + t2)
            for r in range(1, opts.reps):
                b.reset_prefix_cache()
                t, _ = b.complete(tokens(7000 + r, length))
                cold.append(t)
        table = Table(title=f"replica B, {preset} model, {length:,} tokens "
                            f"({pushed.bytes / (1 << 20):.0f} MiB pushed by A)")
        for col in ("(a) cold recompute", "(b) fetch from the remote + restore",
                    "(c) restore, pages local", "(a) / (b)"):
            table.add_column(col, justify="right")
        a_s = statistics.median(cold)
        table.add_row(ms(a_s), ms(fetch_restore[0]),
                      ms(statistics.median(restore)) if restore else "-",
                      f"{a_s / fetch_restore[0]:.1f}x")
        console.print(table)
        console.print(f"cold: {[round(x, 2) for x in cold]} s; fetch + restore: "
                      f"{round(fetch_restore[0], 2)} s; restore: {[round(x, 2) for x in restore]} s")
        return 0
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
