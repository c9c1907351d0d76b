"""Helpers of the remote tests: real snapshots in real stores, and the store's whole content."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def pf(store: Path | None, *args: str, env: dict[str, str | None] | None = None) -> CliResult:
    """Run `pf ARGS` in-process against `store` (PF_STORE); the AWS environment is the test's."""
    from typer.testing import CliRunner

    from processfork_cli.main import run

    base: dict[str, str | None] = {
        "PF_STORE": str(store) if store is not None else None,
        "PF_DEBUG": None,
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }
    base.update(env or {})
    with CliRunner().isolation(env=base) as (stdout, stderr, _mixed):
        code = run(list(args))
        out, err = stdout.getvalue(), stderr.getvalue()
    return CliResult(code, out.decode(), err.decode())
