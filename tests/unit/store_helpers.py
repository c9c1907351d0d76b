"""Shared helpers of the store tests: build real pages, token arrays and snapshots in a real store."""

from __future__ import annotations

import os
from collections.abc import Sequence

from processfork.store import Manifest, SnapshotSequence, Store

BLOCK = 16


def random_pages(n: int, size: int = 256) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def add_sequence(
    store: Store,
    tokens: Sequence[int],
    pages: Sequence[bytes] | None = None,
    *,
    pin: str | None = None,
) -> SnapshotSequence:
    """Store a sequence's pages (two per block: K, V) and tokens; return its manifest entry."""
    blocks = -(-len(tokens) // BLOCK)
    if pages is None:
        pages = random_pages(2 * blocks)
    assert len(pages) == 2 * blocks
    result = store.put_pages(pages, pin=pin)
    ref = store.put_tokens(list(tokens), pin=pin)
    hexes = [d.hex() for d in result.digests]
    return SnapshotSequence(ref, [(hexes[i], hexes[i + 1]) for i in range(0, len(hexes), 2)])


def make_snapshot(
    store: Store,
    name: str,
    *,
    parents: Sequence[str] = (),
    tokens: Sequence[int] | None = None,
    ref: str | None = None,
    move_head: bool = False,
    pages: Sequence[bytes] | None = None,
) -> str:
    """Write a one-sequence snapshot with fresh random pages (or the given ones); return its cid."""
    tokens = list(range(40)) if tokens is None else list(tokens)
    seq = add_sequence(store, tokens, pages)
    m = Manifest(
        name=name,
        parents=list(parents),
        fingerprint={"block_size": BLOCK, "model": "test"},
        sequences=[seq],
    )
    return store.write_snapshot(m, ref=ref, move_head=move_head)


def all_snapshot_objects(store: Store, cid: str) -> tuple[set[bytes], set[bytes]]:
    """(page keys, blob keys) one snapshot needs."""
    m = store.get_snapshot(cid)
    blobs = {bytes.fromhex(d) for d in m.blob_digests()}
    return m.page_keys(), blobs


def assert_intact(store: Store, cid: str) -> None:
    """The snapshot loads, and every page and blob it names is present and hashes to its key."""
    m = store.get_snapshot(cid)
    for seq in m.sequences:
        assert len(store.get_tokens(seq.tokens)) == seq.tokens.count
        for k, v in seq.pages:
            store.get_page(bytes.fromhex(k))
            store.get_page(bytes.fromhex(v))
