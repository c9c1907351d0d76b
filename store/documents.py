"""JSON documents for store objects: what `pf ... --json` prints and what the read-only HTTP routes return.

Free of Typer and Rich on purpose: the server's routes can build the same documents from the same
functions, so `pf show X` and `pf show X --via-server` render identical data. docs/cli.md lists the shapes.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from processfork.store import LogEntry, Manifest, Store

__all__ = [
    "FORK_KEYS",
    "LOG_KEYS",
    "REFS_KEYS",
    "SNAPSHOT_KEYS",
    "diff_doc",
    "head_doc",
    "log_doc",
    "log_entry_doc",
    "reflog_entry_doc",
    "refs_by_cid",
    "refs_doc",
    "snapshot_bytes",
    "snapshot_doc",
    "to_jsonable",
]


# The keys each document must have; the client checks server answers against them.
SNAPSHOT_KEYS = frozenset(
    {"cid", "name", "format", "parents", "fork", "created", "refs", "num_sequences", "num_tokens",
     "num_blocks", "num_pages", "bytes", "fingerprint", "sequences"}
)
LOG_KEYS = frozenset({"head", "entries"})
REFS_KEYS = frozenset({"head", "refs"})
FORK_KEYS = frozenset({"cids", "names"})


def fork_doc(children: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """What `pf fork` and `POST /fork` answer: the children's cids and ref names, in fork order."""
    return {"cids": [cid for _, cid in children], "names": [name for name, _ in children]}


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders digit runs by value: `base/2` before `base/10`, as people count."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", name) if part)


def refs_by_cid(refs: Mapping[str, str]) -> dict[str, list[str]]:
    """Invert name -> cid so every snapshot can show the names that point at it."""
    out: dict[str, list[str]] = {}
    for name, cid in sorted(refs.items(), key=lambda item: natural_key(item[0])):
        out.setdefault(cid, []).append(name)
    return out


def head_doc(store: Store) -> dict[str, Any]:
    head = store.head()
    return {"ref": head.ref, "cid": head.cid}


def _fork_doc(manifest: Manifest) -> dict[str, int] | None:
    fork = manifest.fork
    if fork is None:
        return None
    if isinstance(fork, Mapping):
        return {"index": int(fork["index"]), "of": int(fork["of"])}
    return {"index": int(fork.index), "of": int(fork.of)}


def _hex(digest: Any) -> str:
    return digest.hex() if isinstance(digest, (bytes, bytearray)) else str(digest)


def snapshot_bytes(store: Store, digests: Iterable[str]) -> int:
    """Stored bytes of the distinct pages, read from LMDB's value lengths (no page is copied)."""
    return int(store.pages_size(sorted({bytes.fromhex(_hex(d)) for d in digests})))


def snapshot_doc(
    store: Store, cid: str, manifest: Manifest, *, refs: Sequence[str] = ()
) -> dict[str, Any]:
    """The manifest summary of `pf show`: identity, history, fingerprint and per-sequence sizes."""
    sequences = []
    all_pages: set[str] = set()
    num_blocks = 0
    for seq in manifest.sequences:
        pages = {_hex(d) for pair in seq.pages for d in pair}
        all_pages |= pages
        num_blocks += seq.num_blocks
        sequences.append(
            {
                "tokens": int(seq.tokens.count),
                "token_digest": _hex(seq.tokens.digest),
                "blocks": seq.num_blocks,
                "pages": len(pages),
                # A session turn's partial last block has no page: a checkout recomputes it.
                "unsaved_tail_tokens": int(seq.tokens.count - seq.tokens_with_pages),
            }
        )
    return {
        "cid": cid,
        "name": manifest.name,
        "format": manifest.format,
        "parents": list(manifest.parents),
        "fork": _fork_doc(manifest),
        "created": manifest.created,
        "refs": list(refs),
        "num_sequences": len(sequences),
        "num_tokens": int(manifest.num_tokens),
        "num_blocks": num_blocks,
        "num_pages": len(all_pages),
        "bytes": snapshot_bytes(store, all_pages),
        "fingerprint": to_jsonable(manifest.fingerprint),
        "sequences": sequences,
    }


def log_entry_doc(entry: LogEntry, *, head_cid: str | None = None) -> dict[str, Any]:
    manifest = entry.manifest
    return {
        "cid": entry.cid,
        "name": manifest.name,
        "parents": list(manifest.parents),
        "fork": _fork_doc(manifest),
        "created": manifest.created,
        "num_sequences": len(manifest.sequences),
        "num_tokens": int(manifest.num_tokens),
        "refs": [r for r in entry.refs if r != "HEAD"],
        "head": entry.cid == head_cid,
    }


def log_doc(entries: Sequence[LogEntry], *, head: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "head": dict(head),
        "entries": [log_entry_doc(e, head_cid=head.get("cid")) for e in entries],
    }


def refs_doc(store: Store) -> dict[str, Any]:
    """Every ref with the snapshot it names; refs to a missing snapshot are listed, marked missing."""
    head = head_doc(store)
    rows = []
    for name, cid in sorted(store.list_refs().items(), key=lambda item: natural_key(item[0])):
        row: dict[str, Any] = {"name": name, "cid": cid, "head": head["ref"] == name}
        if store.has_snapshot(cid):
            manifest = store.get_snapshot(cid)
            row.update(snapshot=manifest.name, num_tokens=int(manifest.num_tokens), missing=False)
        else:
            row.update(snapshot=None, num_tokens=None, missing=True)
        rows.append(row)
    return {"head": head, "refs": rows}


def diff_doc(a: str, b: str, result: Any) -> dict[str, Any]:
    doc = {"a": a, "b": b}
    doc.update(to_jsonable(result))
    return doc


def reflog_entry_doc(entry: Any) -> dict[str, Any]:
    return {
        "seq": int(entry.seq),
        "time": to_jsonable(entry.time),
        "old": entry.old,
        "new": entry.new,
        "action": entry.action,
        "message": entry.message,
    }

def to_jsonable(value: Any) -> Any:
    """Convert store records (dataclasses, bytes digests, paths, enums) into plain JSON values."""
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no infinity: "never" ages and the like become null
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        if callable(to_dict):
            return to_jsonable(to_dict())
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, Iterable):
        return [to_jsonable(v) for v in value]
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return to_jsonable(model_dump())
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
