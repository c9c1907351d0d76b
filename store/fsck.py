"""fsck: re-hash every object and check every reference; yields issue records, prints nothing.

Pages are checked in bounded read transactions (a chunk at a time), so a long fsck neither blocks
writers nor pins an old version of the file. The caller decides how to show issues and which exit
code they mean.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lmdb
from processfork.store.digest import (
    canonical_json,
    cid_from_key,
    cid_key,
    cid_of,
    is_cid,
    page_digest,
)
from processfork.store.env import META_FORMAT_KEY, check_format_record
from processfork.store.errors import InvalidName, StoreError
from processfork.store.manifest import FORMATS, InvalidManifest, parse_head, stored_sequences
from processfork.store.meta import REPLACED_PREFIX, meta_items
from processfork.store.objects import decode_pin
from processfork.store.prefix_index import check_index
from processfork.store.refs import HEAD, iter_reflog, list_refs, read_head, validate_ref_name

if TYPE_CHECKING:
    from processfork.store.env import Env

__all__ = ["DAMAGE_KINDS", "FsckIssue", "fsck"]

_CHUNK_BYTES = 256 << 20
_CHUNK_ITEMS = 8192


@dataclass(frozen=True)
class FsckIssue:
    """`kind` is a short code (corrupt-page, missing-page, dangling-ref, ...); `object` what it is about.

    For a damaged or missing page or blob, `snapshots` are the cids whose sequences use it (a
    checkout of them recomputes the blocks it holds) and `refs` the refs, and HEAD, that point at
    one of them: what the user needs to know to decide what to repair (`pf repair`)."""

    kind: str
    object: str
    message: str
    snapshots: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()


#: Issues about an object that snapshots use; they get `snapshots` and `refs`.
DAMAGE_KINDS = frozenset({"corrupt-page", "missing-page", "corrupt-blob", "missing-blob"})


Progress = Callable[[str, int, int], None]


def fsck(env: Env, *, progress: Progress | None = None) -> Iterator[FsckIssue]:
    report = progress or (lambda phase, done, total: None)
    yield from env.read(lambda txn: list(_check_meta(txn, env.dbs)))
    damaged = [
        *_check_content(env, "pages", "page", report),
        *_check_content(env, "blobs", "blob", report),
    ]
    corrupt = {bytes.fromhex(issue.object) for issue in damaged}

    def snapshots(txn: lmdb.Transaction) -> list[FsckIssue]:
        users = _Users()
        replaced = {bytes.fromhex(k[len(REPLACED_PREFIX):])
                    for k in meta_items(txn, env.dbs, REPLACED_PREFIX)}
        issues = list(_check_snapshots(txn, env.dbs, corrupt, users, replaced))
        refs = _refs_by_cid(txn, env.dbs)
        return [users.attach(issue, refs) for issue in [*damaged, *issues]]

    yield from env.read(snapshots, buffers=True)
    yield from env.read(lambda txn: list(_check_refs(txn, env.dbs)), buffers=True)
    yield from env.read(lambda txn: list(_check_small(txn, env.dbs)), buffers=True)
    yield from env.read(lambda txn: [FsckIssue(*i) for i in check_index(txn, env.dbs)])


class _Users:
    """Which snapshots use each damaged or missing object, gathered while manifests are read."""

    def __init__(self) -> None:
        self.by_key: dict[bytes, list[str]] = {}

    def add(self, key: bytes, cid: str) -> None:
        cids = self.by_key.setdefault(key, [])
        if not cids or cids[-1] != cid:
            cids.append(cid)

    def attach(self, issue: FsckIssue, refs: dict[str, list[str]]) -> FsckIssue:
        if issue.kind not in DAMAGE_KINDS:
            return issue
        cids = self.by_key.get(bytes.fromhex(issue.object), [])
        names = sorted({name for cid in cids for name in refs.get(cid, ())}, key=_ref_order)
        return dataclasses.replace(issue, snapshots=tuple(cids), refs=tuple(names))


def _ref_order(name: str) -> tuple[int, str]:
    return (0 if name == HEAD else 1, name)


def _refs_by_cid(txn: lmdb.Transaction, dbs: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, cid in list_refs(txn, dbs).items():
        out.setdefault(cid, []).append(name)
    head = read_head(txn, dbs).cid
    if head:
        out.setdefault(head, []).append(HEAD)
    return out


def _check_meta(txn: lmdb.Transaction, dbs: dict[str, Any]) -> Iterator[FsckIssue]:
    for key, value in txn.cursor(db=dbs["meta"]):
        name = bytes(key).decode("utf-8", "replace")
        try:
            if bytes(key) == META_FORMAT_KEY:
                check_format_record(value)
            elif not isinstance(json.loads(bytes(value)), dict):
                raise ValueError("not a JSON object")
        except (StoreError, ValueError) as exc:
            yield FsckIssue("bad-meta", name, str(exc))


def _check_content(env: Env, db_name: str, kind: str, report: Progress) -> Iterator[FsckIssue]:
    """Every key of `db_name` must be the xxh3-128 of its value."""
    total = env.read(lambda txn: txn.stat(env.dbs[db_name])["entries"])
    start: bytes | None = b""
    done = 0
    while start is not None:

        def chunk(
            txn: lmdb.Transaction, start: bytes = start
        ) -> tuple[list[FsckIssue], bytes | None, int]:
            cur = txn.cursor(db=env.dbs[db_name])
            issues: list[FsckIssue] = []
            if not cur.set_range(start):
                return issues, None, 0
            n = size = 0
            for key, value in cur:
                key = bytes(key)
                if n >= _CHUNK_ITEMS or size >= _CHUNK_BYTES:
                    return issues, key, n
                actual = page_digest(value)
                if actual != key:
                    issues.append(
                        FsckIssue(f"corrupt-{kind}", key.hex(), f"bytes hash to {actual.hex()}")
                    )
                n += 1
                size += len(value)
            return issues, None, n

        issues, start, n = env.read(chunk, buffers=True)
        done += n
        report(db_name, done, total)
        yield from issues


def _check_snapshots(
    txn: lmdb.Transaction, dbs: dict[str, Any], corrupt: set[bytes], users: _Users,
    replaced: set[bytes],
) -> Iterator[FsckIssue]:
    """Every manifest, and what it names; the pages and blobs of a snapshot that a repair
    replaced are not checked: repair cleared its damaged pages, and its refs moved to the copy."""
    pages, blobs, snaps = (txn.cursor(db=dbs[n]) for n in ("pages", "blobs", "snapshots"))
    for key, raw in txn.cursor(db=dbs["snapshots"]):
        cid = cid_from_key(key)
        data = bytes(raw)
        actual = cid_of(data)
        if actual != cid:
            yield FsckIssue("cid-mismatch", cid, f"manifest bytes hash to {actual}")
        try:
            d = json.loads(data)
        except ValueError as exc:
            yield FsckIssue("bad-manifest", cid, f"not JSON: {exc}")
            continue
        if not isinstance(d, dict) or d.get("format") not in FORMATS:
            found = d.get("format") if isinstance(d, dict) else None
            yield FsckIssue("unsupported-format", cid, f"manifest format {found!r}")
            continue
        try:
            head = parse_head(d)
            seqs = stored_sequences(d)
        except (InvalidManifest, StoreError) as exc:
            yield FsckIssue("bad-manifest", cid, str(exc))
            continue
        if canonical_json(d) != data:
            yield FsckIssue("non-canonical", cid, "manifest bytes are not canonical JSON")
        for parent in head["parents"]:
            if not snaps.set_key(cid_key(parent)):
                yield FsckIssue("missing-parent", parent, f"parent of {cid}")
        if bytes(key) in replaced:
            continue
        block_size = head["fingerprint"].get("block_size")
        missing: set[str] = set()
        for i, s in enumerate(seqs):
            yield from _check_sequence(cid, i, s, blobs, pages, missing, block_size, corrupt, users)


def _check_sequence(
    cid: str,
    index: int,
    s: dict[str, Any],
    blobs: lmdb.Cursor,
    pages: lmdb.Cursor,
    missing: set[str],
    block_size: Any,
    corrupt: set[bytes],
    users: _Users,
) -> Iterator[FsckIssue]:
    where = f"sequence {index} of {cid}"
    tok, tab = s["tokens"], s["pages"]
    present = {}
    for blob, what in ((tok["digest"], "token ids"), (tab["digest"], "page table")):
        key = bytes.fromhex(blob)
        present[blob] = blobs.set_key(key)
        if key in corrupt or not present[blob]:
            users.add(key, cid)
        if not present[blob] and blob not in missing:
            missing.add(blob)
            yield FsckIssue("missing-blob", blob, f"{what} of {where}")
    if present[tok["digest"]] and blobs.set_key(bytes.fromhex(tok["digest"])) and (
        len(blobs.value()) != 4 * tok["count"]
    ):
        yield FsckIssue("bad-tokens", tok["digest"], f"{where}: blob size does not match count")
    sized = isinstance(block_size, int) and not isinstance(block_size, bool) and block_size > 0
    # A session turn's partial last block may have no page: its blocks with pages end before it.
    paged = s.get("paged_tokens", tok["count"])
    if sized and paged != tok["count"] and (paged % block_size or tok["count"] - paged >= block_size):
        yield FsckIssue(
            "bad-block-count",
            cid,
            f"{where}: paged_tokens {paged} of {tok['count']} is not the sequence's whole "
            f"blocks of {block_size}",
        )
    needed = math.ceil(paged / block_size) if sized else None
    heads = s.get("heads", 1)  # page pairs per block: one per KV head in a v4 manifest
    if needed is not None and "groups" in s:
        # Each KV-cache group stores a run of blocks that ends with the sequence's last block;
        # a state group the one state at the split point (the last whole block before the last
        # token), or none: a session turn whose state the engine never held on its own.
        split = (tok["count"] - 1) // block_size if tok["count"] else 0
        ends = [g["first"] + g["count"] for g in s["groups"]]
        wanted = [(split if g.get("state") else needed) for g in s["groups"]]
        states_ok = all(g["count"] in ((0, 1) if split else (0,))
                        for g in s["groups"] if g.get("state"))
        if ends != wanted or not states_ok:
            yield FsckIssue(
                "bad-block-count",
                cid,
                f"{where}: {paged} tokens end at block {needed} of {block_size}, its "
                f"groups end at {ends}",
            )
    elif needed is not None and needed * heads != tab["count"]:
        yield FsckIssue(
            "bad-block-count",
            cid,
            f"{where}: {paged} tokens need {needed} blocks of {block_size}, found "
            f"{tab['count'] // heads}" + (f" ({tab['count']} page pairs of {heads} heads)"
                                          if heads > 1 else ""),
        )
    if not present[tab["digest"]] or not blobs.set_key(bytes.fromhex(tab["digest"])):
        return
    table = bytes(blobs.value())
    if len(table) != 32 * tab["count"]:
        yield FsckIssue("bad-page-table", tab["digest"], f"{where}: size does not match count")
    for i in range(0, len(table) - len(table) % 16, 16):
        key = table[i : i + 16]
        if key in corrupt or key.hex() in missing:
            users.add(key, cid)
        elif not pages.set_key(key):
            missing.add(key.hex())
            users.add(key, cid)
            yield FsckIssue("missing-page", key.hex(), f"block {i // 32 // heads} of {where}")


def _check_refs(txn: lmdb.Transaction, dbs: dict[str, Any]) -> Iterator[FsckIssue]:
    snaps = txn.cursor(db=dbs["snapshots"])
    for key, raw in txn.cursor(db=dbs["refs"]):
        name = bytes(key).decode("utf-8", "replace")
        value = bytes(raw).decode("utf-8", "replace")
        if name == HEAD and value.startswith("ref: "):
            try:
                validate_ref_name(value[5:])
            except InvalidName as exc:
                yield FsckIssue("bad-ref", HEAD, f"symbolic target: {exc}")
            continue
        if name != HEAD:
            try:
                validate_ref_name(name)
            except InvalidName as exc:
                yield FsckIssue("bad-ref", name, str(exc))
        if not is_cid(value):
            yield FsckIssue("bad-ref", name, f"value {value[:80]!r} is not a cid")
        elif not snaps.set_key(cid_key(value)):
            yield FsckIssue("dangling-ref", name, f"points to missing snapshot {value}")


def _check_small(txn: lmdb.Transaction, dbs: dict[str, Any]) -> Iterator[FsckIssue]:
    """Reflog, pins and journal records must be well-formed."""
    snaps = txn.cursor(db=dbs["snapshots"])
    for key, name, entry in iter_reflog(txn, dbs):
        if entry is None:
            yield FsckIssue("bad-reflog", bytes(key).hex(), "malformed reflog record")
            continue
        for cid in (entry.old, entry.new):
            if cid and not snaps.set_key(cid_key(cid)):
                yield FsckIssue(
                    "dangling-reflog", f"{name}@{{{entry.seq}}}", f"names missing {cid}"
                )
    for key, value in txn.cursor(db=dbs["pins"]):
        name = bytes(key).decode("utf-8", "replace")
        try:
            decode_pin(name, value)
        except ValueError as exc:
            yield FsckIssue("bad-pin", name, str(exc))
    sizes = {b"p": 17, b"b": 17, b"s": 33}
    for key, value in txn.cursor(db=dbs["journal"]):
        key = bytes(key)
        if sizes.get(key[:1]) != len(key) or len(value) != 8:
            yield FsckIssue("bad-journal", key.hex(), "malformed journal record")
