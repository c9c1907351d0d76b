"""Snapshots of pages of one KV head (format v4, written by a tensor-parallel engine) through a
remote: `pf push` sends every head's pages, `pf clone` brings them back byte for byte with the
manifest, the clone's format record becomes version 4 with it, and `pf fsck` finds nothing; a
child that reuses its parent's head pages sends only its new ones."""

from __future__ import annotations

import os
from pathlib import Path

from processfork.store import Manifest, SnapshotSequence, Store
from processfork.store.manifest import FORMAT_HEADS
from remote_helpers import BLOCK, content, pf

HEADS = 4
HEAD_PAGE = 1024
FINGERPRINT = {"block_size": BLOCK, "model": "t", "tp_size": 2, "num_kv_heads": HEADS}


def _head_snapshot(store: Store, ref: str, tokens: list[int], *, parent: str | None = None,
                   ) -> str:
    """A v4 snapshot of ``tokens``: fresh random pages of one head for each block the parent
    does not hold, the parent's own pages for those it does."""
    blocks = -(-len(tokens) // BLOCK)
    pairs: list[tuple[str, str]] = []
    if parent is not None:
        seq = store.get_snapshot(parent).sequences[0]
        whole = len(store.get_tokens(seq.tokens)) // BLOCK  # not its partial last block
        pairs = list(seq.pages)[: whole * HEADS]
    new = 2 * (blocks * HEADS - len(pairs))
    digests = [d.hex() for d in store.put_pages([os.urandom(HEAD_PAGE) for _ in range(new)])
               .digests]
    pairs += [(digests[i], digests[i + 1]) for i in range(0, len(digests), 2)]
    seq = SnapshotSequence(store.put_tokens(tokens), pairs, heads=HEADS)
    m = Manifest(format=FORMAT_HEADS, name=ref, parents=[parent] if parent else [],
                 fingerprint=FINGERPRINT, sequences=[seq])
    return store.write_snapshot(m, ref=ref, move_head=False)


def test_a_v4_snapshot_travels_through_push_and_clone(tmp_path: Path, remote_url: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    tokens = list(range(5 * BLOCK + 3))  # six blocks, the last one partial
    with Store(a) as st:
        base = _head_snapshot(st, "tp", tokens)
    assert pf(a, "remote", "add", "origin", remote_url).exit_code == 0
    pushed = pf(a, "push", "origin", "tp", "--json")
    assert pushed.exit_code == 0, pushed.stderr
    assert pushed.json()["pages"] == 2 * 6 * HEADS and pushed.json()["snapshots"] == 1

    cloned = pf(None, "clone", remote_url, str(b), "--json")
    assert cloned.exit_code == 0, cloned.stderr
    assert cloned.json()["fetch"]["pages"] == 2 * 6 * HEADS
    with Store(a) as sa, Store(b) as sb:
        assert sb.list_refs()["tp"] == base
        assert content(sb, base) == content(sa, base)
        m = sb.get_snapshot(base)
        assert m.format == FORMAT_HEADS and m.sequences[0].heads == HEADS
        assert sb.meta_get("format")["version"] == 4
    fsck = pf(b, "fsck")
    assert fsck.exit_code == 0, fsck.stdout + fsck.stderr

    # A child continuing the last (partial) block stores that block and one more afresh.
    with Store(a) as st:
        child = _head_snapshot(st, "tp", [*tokens, *range(1000, 1000 + BLOCK)], parent=base)
    pushed = pf(a, "push", "origin", "tp", "--json")
    assert pushed.exit_code == 0, pushed.stderr
    assert pushed.json()["pages"] == 2 * 2 * HEADS
    pulled = pf(b, "pull", "origin", "--json")
    assert pulled.exit_code == 0, pulled.stderr
    assert pulled.json()["fetch"]["pages"] == 2 * 2 * HEADS
    with Store(a) as sa, Store(b) as sb:
        assert sb.list_refs()["tp"] == child and content(sb, child) == content(sa, child)
    assert pf(b, "fsck").exit_code == 0
