"""Where things live in a remote's folder, and the small records there (docs/format.md, Remotes).

    pf-remote.json           {"format":"processfork-remote","version":1}, created once
    packs/<sha256>.pack      objects back to back; named by the SHA-256 of its object list
    packs/<sha256>.idx       the pack's index (canonical JSON); a pack without one is not there
    refs/<name>              "sha256:<64 hex>\n": the only objects that change
    prefix/<64 hex>          a snapshot's prefix record (store/remote/prefix.py), by its cid
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from processfork.store.digest import canonical_json, is_cid

__all__ = [
    "FORMAT_PATH",
    "REMOTE_FORMAT",
    "REMOTE_VERSION",
    "RefValue",
    "decode_ref",
    "encode_ref",
    "format_record",
    "idx_path",
    "pack_name_of",
    "pack_path",
    "prefix_cid_of",
    "prefix_path",
    "ref_path",
]

REMOTE_FORMAT = "processfork-remote"
REMOTE_VERSION = 1
FORMAT_PATH = "pf-remote.json"
PACKS = "packs"
REFS = "refs"
PREFIXES = "prefix"


def format_record() -> bytes:
    return canonical_json({"format": REMOTE_FORMAT, "version": REMOTE_VERSION})


def understood(raw: bytes) -> str | None:
    """None when `raw` is a format record this implementation understands, else what it says."""
    try:
        record = json.loads(raw)
    except ValueError:
        return "an unreadable format record"
    if not isinstance(record, dict):
        return "an unreadable format record"
    found = f"{record.get('format')!r} version {record.get('version')!r}"
    if record.get("format") != REMOTE_FORMAT or record.get("version") != REMOTE_VERSION:
        return found
    return None


def pack_path(name: str) -> str:
    return f"{PACKS}/{name}.pack"


def idx_path(name: str) -> str:
    return f"{PACKS}/{name}.idx"


def pack_name_of(path: str) -> str | None:
    """The pack name of `packs/<name>.idx` (None for anything else)."""
    if path.startswith(PACKS + "/") and path.endswith(".idx"):
        name = path[len(PACKS) + 1 : -len(".idx")]
        if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
            return name
    return None


def prefix_path(cid: str) -> str:
    """Where the prefix record of snapshot `cid` (`sha256:<64 hex>`) lives."""
    return f"{PREFIXES}/{cid[len('sha256:'):]}"


def prefix_cid_of(path: str) -> str | None:
    """The cid of `prefix/<64 hex>` (None for anything else)."""
    if path.startswith(PREFIXES + "/"):
        name = path[len(PREFIXES) + 1 :]
        if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
            return "sha256:" + name
    return None


def ref_path(name: str) -> str:
    return f"{REFS}/{name}"


@dataclass(frozen=True)
class RefValue:
    cid: str
    etag: str  # what a conditional write must match to move it


def encode_ref(cid: str) -> bytes:
    return cid.encode("ascii") + b"\n"


def decode_ref(raw: bytes) -> str | None:
    """The cid a ref object holds, None when it holds anything else."""
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return text if is_cid(text) else None
