"""Helpers of the remote tests: real snapshots in real stores, and the store's whole content."""

from __future__ import annotations

import os
from collections.abc import Sequence

from processfork.store import Manifest, SnapshotSequence, Store

BLOCK = 16


def make_snapshot(
    store: Store,
    ref: str,
    *,
    parents: Sequence[str] = (),
    tokens: Sequence[int] | None = None,
    page_size: int = 4096,
    pages: Sequence[bytes] | None = None,
) -> str:
    """A one-sequence snapshot of fresh random pages (two per block), committed under `ref`."""
    tokens = list(range(40)) if tokens is None else list(tokens)
    blocks = -(-len(tokens) // BLOCK)
    if pages is None:
        pages = [os.urandom(page_size) for _ in range(2 * blocks)]
    digests = [d.hex() for d in store.put_pages(pages).digests]
    seq = SnapshotSequence(
        store.put_tokens(tokens), [(digests[i], digests[i + 1]) for i in range(0, len(digests), 2)]
    )
    m = Manifest(name=ref, parents=list(parents), fingerprint={"block_size": BLOCK, "model": "t"},
                 sequences=[seq])
    return store.write_snapshot(m, ref=ref, move_head=False)


def content(store: Store, cid: str) -> tuple[bytes, dict[str, bytes], list[list[int]]]:
    """A snapshot's manifest bytes, every page's bytes and every sequence's tokens."""
    m = store.get_snapshot(cid)
    pages = {d: store.get_page(bytes.fromhex(d)) for d in sorted(m.page_digests())}
    return m.canonical_bytes(), pages, [store.get_tokens(s.tokens) for s in m.sequences]
