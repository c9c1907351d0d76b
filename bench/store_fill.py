"""Fill a store with snapshots that no request of a benchmark matches.

A long-lived server's store holds many snapshots, and with auto-restore on every request that
misses vLLM's prefix cache is looked up in their prefix index. The benchmarks that measure that
lookup fill a store first, with the store's own API rather than through an engine: an engine
would have to prefill every snapshot (minutes each on a CPU machine), and the index does not
depend on how a snapshot was taken. ``Store.write_snapshot`` indexes a manifest's blocks under
the partition of its fingerprint (and no salt), from its tokens alone, in the same transaction
and with the same records as a snapshot the connector commits; so a store filled here under an
engine's fingerprint holds the index records that engine's own snapshots of the same tokens
would. The pages are small random bytes: no lookup reads a page, only a restore would, and
nothing restores these.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from processfork.store import Manifest, SnapshotSequence, Store
from processfork.store.prefix_index import partition_root


def random_tokens(rng: random.Random, n: int, vocab: int, low: int = 10) -> list[int]:
    """Token ids in ``[low, vocab)``; ids below ``low`` are the model builder's special ones."""
    return [rng.randrange(low, vocab) for _ in range(n)]


def fill(
    path: Path,
    fingerprint: dict[str, Any],
    snapshots: int,
    tokens: int,
    *,
    vocab: int,
    seed: int = 7,
    page_bytes: int = 2048,
    ref_prefix: str = "filler",
) -> list[list[int]]:
    """Write ``snapshots`` one-sequence snapshots of ``tokens`` random tokens each, every one
    under its own ref ``{ref_prefix}/{i}`` (HEAD untouched); returns their token lists.

    Each snapshot is what a snapshot commit writes: its pages, its token blob, then the manifest,
    its index records and its ref in one transaction.
    """
    rng = random.Random(seed)
    block_size = int(fingerprint["block_size"])
    blocks = -(-tokens // block_size)
    seqs = []
    with Store(path) as store:
        for i in range(snapshots):
            toks = random_tokens(rng, tokens, vocab)
            result = store.put_pages([rng.randbytes(page_bytes) for _ in range(2 * blocks)])
            ref = store.put_tokens(toks)
            hexes = [d.hex() for d in result.digests]
            pages = [(hexes[j], hexes[j + 1]) for j in range(0, len(hexes), 2)]
            store.write_snapshot(
                Manifest(name=f"{ref_prefix}-{i}", parents=[], fingerprint=fingerprint,
                         sequences=[SnapshotSequence(ref, pages)]),
                ref=f"{ref_prefix}/{i}", move_head=False)
            seqs.append(toks)
    return seqs


def index_entries(path: Path) -> int:
    """Records in the store's prefix index (block entries and one per indexed snapshot)."""
    with Store(path) as store:
        return store._read(lambda txn: txn.stat(store.dbs["prefix"])["entries"])


def found_blocks(path: Path, fingerprint: dict[str, Any], toks: list[int]) -> int:
    """How many whole blocks of ``toks`` the index finds in ``fingerprint``'s partition (no
    salt): the check that filled snapshots are where an engine with that fingerprint looks."""
    block_size = int(fingerprint["block_size"])
    with Store(path) as store:
        hit = store.longest_prefix(partition_root(fingerprint), toks, block_size, first=0,
                                   limit=len(toks) // block_size)
    return 0 if hit is None else hit.blocks
