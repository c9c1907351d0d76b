"""Refs, HEAD and the reflog, as operations inside a caller's LMDB write transaction.

Every ref move is a compare-and-swap against the value read in the same transaction (like dulwich's
`set_if_equals`) and appends its reflog entry in that same transaction, so history and refs never
disagree, even after a kill -9.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lmdb
from processfork.store.digest import canonical_json, is_cid, normalize_cid
from processfork.store.errors import InvalidName, RefConflict

__all__ = [
    "ANY",
    "FETCH_HEAD",
    "HEAD",
    "HeadInfo",
    "ReflogEntry",
    "validate_ref_name",
]

HEAD = "HEAD"
#: Not a ref: the reflog of the snapshots fetched from a remote by cid (a server's transparent
#: restores and checkouts of a cid), one `fetch` entry each, so gc keeps them as it keeps what
#: any reflog entry names, until the entry expires.
FETCH_HEAD = "FETCH_HEAD"
_SYMREF = "ref: "
_MAX_NAME_BYTES = 255
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


class _AnyValue:
    """Sentinel: 'do not check the old value' (distinct from None, 'the ref must not exist')."""

    _instance: _AnyValue | None = None

    def __new__(cls) -> _AnyValue:  # noqa: PYI034 (a singleton, never subclassed)
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _AnyValue()


@dataclass(frozen=True)
class HeadInfo:
    """HEAD: `ref` set when symbolic (cid None if that ref does not exist yet), else detached at `cid`."""

    ref: str | None
    cid: str | None

    @property
    def detached(self) -> bool:
        return self.ref is None and self.cid is not None


@dataclass(frozen=True)
class ReflogEntry:
    """One move of a ref: `time` in Unix seconds; `old`/`new` are cids or None (created/deleted)."""

    seq: int
    time: float
    old: str | None
    new: str | None
    action: str
    message: str


def validate_ref_name(name: str) -> str:
    """git check-ref-format rules, plus: no leading '-', not 'HEAD' or 'FETCH_HEAD', at most 255
    UTF-8 bytes."""
    if not isinstance(name, str) or not name:
        raise InvalidName(str(name), "empty")
    reason = None
    if name == HEAD:
        reason = "HEAD is reserved; use checkout_head"
    elif name == FETCH_HEAD:
        reason = "FETCH_HEAD is reserved: the reflog of snapshots fetched by cid"
    elif len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        reason = f"longer than {_MAX_NAME_BYTES} bytes"
    elif name.startswith("-"):
        reason = "starts with '-'"
    elif _BAD_CHARS.search(name):
        reason = "contains a space, control character or one of ~ ^ : ? * [ \\"
    elif ".." in name or "@{" in name or name == "@":
        reason = "contains '..' or '@{'"
    elif name.startswith("/") or name.endswith("/") or "//" in name:
        reason = "empty path component"
    elif name.endswith((".", ".lock")):
        reason = "ends with '.' or '.lock'"
    elif any(part.startswith(".") for part in name.split("/")):
        reason = "a component starts with '.'"
    if reason:
        raise InvalidName(name, reason)
    return name


def _norm_expected(expected: Any) -> Any:
    if expected is ANY or expected is None:
        return expected
    return normalize_cid(expected)


# -- raw encodings --------------------------------------------------------------------------
def _read_raw(txn: lmdb.Transaction, dbs: dict[str, Any], name: str) -> str | None:
    raw = txn.get(name.encode("utf-8"), db=dbs["refs"])
    return None if raw is None else bytes(raw).decode("utf-8")


def read_ref(txn: lmdb.Transaction, dbs: dict[str, Any], name: str) -> str | None:
    """The cid a (non-HEAD) ref names, or None when it does not exist."""
    value = _read_raw(txn, dbs, name)
    if value is None or not is_cid(value):
        return None
    return value


def read_head(txn: lmdb.Transaction, dbs: dict[str, Any]) -> HeadInfo:
    value = _read_raw(txn, dbs, HEAD)
    if value is None:
        return HeadInfo(None, None)
    if value.startswith(_SYMREF):
        target = value[len(_SYMREF) :]
        return HeadInfo(target, read_ref(txn, dbs, target))
    return HeadInfo(None, value if is_cid(value) else None)


def list_refs(txn: lmdb.Transaction, dbs: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in txn.cursor(db=dbs["refs"]):
        name = bytes(key).decode("utf-8")
        text = bytes(value).decode("utf-8")
        if name != HEAD and is_cid(text):
            out[name] = text
    return out


# -- reflog -----------------------------------------------------------------------------------
def reflog_key(name: str, seq: int) -> bytes:
    return name.encode("utf-8") + b"\x00" + struct.pack(">Q", seq)


def split_reflog_key(key: bytes) -> tuple[str, int]:
    key = bytes(key)
    if len(key) < 10 or key[-9] != 0:
        raise ValueError(f"bad reflog key {key!r}")
    return key[:-9].decode("utf-8"), struct.unpack(">Q", key[-8:])[0]


def parse_reflog_value(seq: int, value: bytes) -> ReflogEntry:
    d = json.loads(bytes(value))
    if not isinstance(d, dict) or set(d) != {"time", "old", "new", "action", "message"}:
        raise ValueError("reflog entry must be {time, old, new, action, message}")
    for k in ("old", "new"):
        if d[k] is not None and not is_cid(d[k]):
            raise ValueError(f"reflog {k} is not a cid: {d[k]!r}")
    bad_time = not isinstance(d["time"], (int, float)) or isinstance(d["time"], bool)
    bad_text = not isinstance(d["action"], str) or not isinstance(d["message"], str)
    if bad_time or bad_text:
        raise ValueError("reflog time must be a number, action and message strings")
    return ReflogEntry(seq, float(d["time"]), d["old"], d["new"], d["action"], d["message"])


def _last_seq(txn: lmdb.Transaction, dbs: dict[str, Any], name: str) -> int:
    prefix = name.encode("utf-8") + b"\x00"
    cur = txn.cursor(db=dbs["reflog"])
    if cur.set_range(name.encode("utf-8") + b"\x01"):
        found = cur.prev()
    else:
        found = cur.last()
    if found:
        key = bytes(cur.key())
        if key.startswith(prefix) and len(key) == len(prefix) + 8:
            return struct.unpack(">Q", key[len(prefix) :])[0]
    return 0


def append_reflog(
    txn: lmdb.Transaction,
    dbs: dict[str, Any],
    name: str,
    old: str | None,
    new: str | None,
    action: str,
    message: str,
    now: float | None = None,
) -> int:
    seq = _last_seq(txn, dbs, name) + 1
    value = {
        "action": action,
        "message": message,
        "new": new,
        "old": old,
        "time": round(time.time() if now is None else now, 6),
    }
    txn.put(reflog_key(name, seq), canonical_json(value), db=dbs["reflog"])
    return seq


def read_reflog(txn: lmdb.Transaction, dbs: dict[str, Any], name: str) -> list[ReflogEntry]:
    """Entries oldest first; malformed ones are skipped here (fsck reports them)."""
    prefix = name.encode("utf-8") + b"\x00"
    cur = txn.cursor(db=dbs["reflog"])
    out = []
    if cur.set_range(prefix):
        for key, value in cur:
            key = bytes(key)
            if not key.startswith(prefix):
                break
            try:
                _, seq = split_reflog_key(key)
                out.append(parse_reflog_value(seq, value))
            except (ValueError, UnicodeDecodeError):
                continue
    return out


def iter_reflog(
    txn: lmdb.Transaction, dbs: dict[str, Any]
) -> Iterator[tuple[bytes, str, ReflogEntry | None]]:
    """Every reflog record as (key, ref name, entry or None when malformed)."""
    for key, value in txn.cursor(db=dbs["reflog"]):
        key = bytes(key)
        try:
            name, seq = split_reflog_key(key)
            yield key, name, parse_reflog_value(seq, value)
        except (ValueError, UnicodeDecodeError):
            yield key, "", None


# -- moves --------------------------------------------------------------------------------------
def set_ref(
    txn: lmdb.Transaction,
    dbs: dict[str, Any],
    name: str,
    cid: str | None,
    *,
    expected_old: Any = ANY,
    action: str = "update",
    message: str = "",
    now: float | None = None,
) -> str | None:
    """CAS-move (or delete, with cid None) `name`; log it, and log HEAD too when HEAD follows it.

    Returns the old value.
    """
    validate_ref_name(name)
    new = None if cid is None else normalize_cid(cid)
    expected = _norm_expected(expected_old)
    actual = read_ref(txn, dbs, name)
    if expected is not ANY and expected != actual:
        raise RefConflict(name, expected, actual)
    key = name.encode("utf-8")
    if new is None:
        txn.delete(key, db=dbs["refs"])
    else:
        txn.put(key, new.encode("ascii"), db=dbs["refs"])
    append_reflog(txn, dbs, name, actual, new, action, message, now)
    head_raw = _read_raw(txn, dbs, HEAD)
    if head_raw == _SYMREF + name and actual != new:
        append_reflog(txn, dbs, HEAD, actual, new, action, message, now)
    return actual


def set_head(
    txn: lmdb.Transaction,
    dbs: dict[str, Any],
    *,
    ref: str | None = None,
    cid: str | None = None,
    action: str = "checkout",
    message: str = "",
    now: float | None = None,
) -> HeadInfo:
    """Point HEAD at `ref` (symbolic) or detach it at `cid`; one HEAD reflog entry either way."""
    old = read_head(txn, dbs)
    if ref is not None:
        validate_ref_name(ref)
        value = _SYMREF + ref
    elif cid is not None:
        value = normalize_cid(cid)
    else:
        raise ValueError("set_head needs a ref or a cid")  # a caller bug, not input
    txn.put(HEAD.encode("ascii"), value.encode("utf-8"), db=dbs["refs"])
    new = read_head(txn, dbs)
    append_reflog(txn, dbs, HEAD, old.cid, new.cid, action, message, now)
    return new
