"""`diff a b`: where two snapshots' token streams part, and which pages (and bytes) they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import lmdb
from processfork.store.errors import MissingObject
from processfork.store.manifest import Manifest
from processfork.store.objects import pages_size
from processfork.store.revparse import resolve_in
from processfork.store.snapshots import load_manifest

if TYPE_CHECKING:
    import numpy as np
    from processfork.store.env import Env

__all__ = ["DiffResult", "diff"]


@dataclass(frozen=True)
class DiffResult:
    """Tokens compare the first sequence of each snapshot; pages compare all sequences as sets.

    `first_divergent_index` is None when the token streams are equal; `token_a`/`token_b` are the
    tokens at that index (None past the end of the shorter stream).
    """

    a: str
    b: str
    common_prefix_tokens: int
    first_divergent_index: int | None
    token_a: int | None
    token_b: int | None
    shared_pages: int
    unique_a: int
    unique_b: int
    shared_bytes: int
    unique_a_bytes: int
    unique_b_bytes: int


def _tokens(txn: lmdb.Transaction, dbs: dict, m: Manifest) -> np.ndarray:
    import numpy as np  # lazily: numpy costs `pf` a tenth of a second to start
    if not m.sequences:
        return np.zeros(0, dtype="<i4")
    digest = m.sequences[0].tokens.digest
    raw = txn.get(bytes.fromhex(digest), db=dbs["blobs"])
    if raw is None:
        raise MissingObject("blob", digest)
    return np.frombuffer(bytes(raw), dtype="<i4")


def diff(env: Env, a: str, b: str) -> DiffResult:
    dbs = env.dbs

    def run(txn: lmdb.Transaction) -> DiffResult:
        import numpy as np  # lazily: numpy costs `pf` a tenth of a second to start
        cid_a, cid_b = resolve_in(txn, dbs, a), resolve_in(txn, dbs, b)
        ma, mb = load_manifest(txn, dbs, cid_a), load_manifest(txn, dbs, cid_b)
        ta, tb = _tokens(txn, dbs, ma), _tokens(txn, dbs, mb)
        n = min(len(ta), len(tb))
        mismatch = np.flatnonzero(ta[:n] != tb[:n])
        common = int(mismatch[0]) if mismatch.size else n
        if common == len(ta) == len(tb):
            first, tok_a, tok_b = None, None, None
        else:
            first = common
            tok_a = int(ta[common]) if common < len(ta) else None
            tok_b = int(tb[common]) if common < len(tb) else None
        pa, pb = ma.page_keys(), mb.page_keys()
        shared, only_a, only_b = pa & pb, pa - pb, pb - pa
        return DiffResult(
            a=cid_a,
            b=cid_b,
            common_prefix_tokens=common,
            first_divergent_index=first,
            token_a=tok_a,
            token_b=tok_b,
            shared_pages=len(shared),
            unique_a=len(only_a),
            unique_b=len(only_b),
            shared_bytes=pages_size(txn, dbs, shared),
            unique_a_bytes=pages_size(txn, dbs, only_a),
            unique_b_bytes=pages_size(txn, dbs, only_b),
        )

    return env.read(run, buffers=True)
