"""The scheduler's hot path: what a prefix-index lookup costs, against vLLM's own block hashing of
the same request, in one run.

    .venv/bin/python bench/prefix_lookup_bench.py [--snapshots 1000] [--tokens 4096]

A store with N one-sequence snapshots of ``--tokens`` random tokens each (32-token blocks, 2 KiB
pages: the index does not care about page size). Timed, per request of ``--tokens`` tokens:

- miss: a request that no snapshot starts with (what every request pays with auto-restore on and
  nothing stored for it): hashing its first block and one lookup;
- hit: a request that is one stored snapshot plus one block: hashing every block and one lookup
  per block;
- baseline: vLLM's own per-request block hashing (``sha256`` over the same blocks, as
  ``get_request_block_hasher`` does), which vLLM runs for every request anyway.

Each figure is the median over 2,000 requests (200 for hits), after one warm-up pass.
"""

from __future__ import annotations

import argparse
import pickle
import random
import statistics
import sys
import tempfile
import time
from hashlib import sha256
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from processfork.store import Store
from processfork.store.prefix_index import partition_root
from rich.console import Console
from rich.table import Table
from store_fill import fill, random_tokens

BLOCK = 32
FINGERPRINT = {"block_size": BLOCK, "model": "bench", "kv_dtype": "float32"}
VOCAB = 32000


def _tokens(rng: random.Random, n: int) -> list[int]:
    return random_tokens(rng, n, VOCAB)


def vllm_hashing(toks: list[int]) -> None:
    """vLLM's per-request block hashes: sha256 of (parent hash, block tokens, extra keys)."""
    parent = b"\0" * 32
    for i in range(len(toks) // BLOCK):
        parent = sha256(pickle.dumps((parent, tuple(toks[i * BLOCK:(i + 1) * BLOCK]), None),
                                     protocol=pickle.HIGHEST_PROTOCOL)).digest()


def timed(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=4096)
    opts = parser.parse_args()
    rng = random.Random(8)  # the requests' tokens; the stored ones come from seed 7
    n = opts.tokens
    with tempfile.TemporaryDirectory() as tmp:
        seqs = fill(Path(tmp) / "store", FINGERPRINT, opts.snapshots, n, vocab=VOCAB, seed=7)
        root = partition_root(FINGERPRINT)
        limit = (n - 1) // BLOCK
        with Store(Path(tmp) / "store") as store:
            misses = [_tokens(rng, n) for _ in range(50)]
            hits = [seqs[i] + _tokens(rng, BLOCK) for i in range(0, len(seqs), max(1, len(seqs) // 20))]

            def miss() -> None:
                for toks in misses:
                    assert store.longest_prefix(root, toks, BLOCK, first=0, limit=limit) is None

            def hit() -> None:
                for toks in hits:
                    found = store.longest_prefix(root, toks, BLOCK, first=0, limit=(len(toks) - 1) // BLOCK)
                    assert found is not None and found.blocks == n // BLOCK

            def baseline() -> None:
                for toks in misses:
                    vllm_hashing(toks)

            t_miss = timed(miss, 40) / len(misses)
            t_hit = timed(hit, 10) / len(hits)
            t_base = timed(baseline, 10) / len(misses)
            entries = store._read(lambda txn: txn.stat(store.dbs["prefix"])["entries"])
    table = Table(title=f"prefix lookup, {opts.snapshots} snapshots of {n} tokens "
                        f"({entries:,} index records)")
    for col in ("request", "lookup", "vLLM's block hashing", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("miss", f"{t_miss * 1e6:,.1f} us", f"{t_base * 1e6:,.1f} us", f"{t_miss / t_base:.3f}")
    table.add_row(f"hit ({n // BLOCK} blocks)", f"{t_hit * 1e6:,.1f} us", f"{t_base * 1e6:,.1f} us",
                  f"{t_hit / t_base:.3f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
