"""Content addresses: xxh3-128 for pages and blobs, sha256 cids for manifests, canonical JSON.

Pages are hashed on the engine's hot path, so they use xxh3-128 (many GB/s, 16-byte keys). Manifests
are few and small and name the history, so they use sha256 like git's object ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import xxhash
from processfork.store.errors import InvalidDigest, InvalidName

__all__ = [
    "CID_PREFIX",
    "canonical_json",
    "cid_from_key",
    "cid_key",
    "cid_of",
    "digest_from_hex",
    "is_cid",
    "normalize_cid",
    "page_digest",
]

CID_PREFIX = "sha256:"
_CID_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{32}$")

page_digest = xxhash.xxh3_128_digest
"""`page_digest(buf) -> bytes`: the 16-byte xxh3-128 digest (canonical big-endian) of any buffer."""


def digest_from_hex(text: str) -> bytes:
    """Parse a 32-hex-digit page or blob digest; anything else is a caller's mistake."""
    if not isinstance(text, str) or not _DIGEST_RE.match(text):
        raise InvalidDigest(str(text))
    return bytes.fromhex(text)


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value that cids are computed over (sorted keys, no spaces, UTF-8)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def cid_of(data: bytes) -> str:
    """`sha256:<hex>` of canonical manifest bytes."""
    return CID_PREFIX + hashlib.sha256(data).hexdigest()


def is_cid(text: object) -> bool:
    """True for a full, normalized cid (`sha256:` and 64 lowercase hex digits)."""
    return isinstance(text, str) and bool(_CID_RE.match(text))


def normalize_cid(text: str) -> str:
    """Accept `sha256:<64 hex>` or bare 64 hex (any case) and return the normalized cid."""
    t = text.strip().lower()
    if not t.startswith(CID_PREFIX):
        t = CID_PREFIX + t
    if not _CID_RE.match(t):
        raise InvalidName(text, "a cid is 'sha256:' and 64 hex digits")
    return t


def cid_key(cid: str) -> bytes:
    """The 32-byte LMDB key of a cid in the `snapshots` database."""
    return bytes.fromhex(normalize_cid(cid)[len(CID_PREFIX) :])


def cid_from_key(key: bytes) -> str:
    return CID_PREFIX + bytes(key).hex()
