"""Errors of the store: each carries its facts as fields and prints as one line.

Callers (the CLI, the HTTP routes) branch on the class and show `str(exc)` to the user, so every
message names the object it is about and never needs a traceback to be understood.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AmbiguousRevision",
    "CorruptPage",
    "InvalidAge",
    "InvalidArgument",
    "InvalidCount",
    "InvalidDigest",
    "InvalidName",
    "MalformedObject",
    "MissingObject",
    "PageSizeMismatch",
    "ReadOnlyStore",
    "RefConflict",
    "RefIsHead",
    "StoreError",
    "StoreFull",
    "StoreNotFound",
    "UnknownRevision",
    "UnsupportedFormat",
]


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class UnknownRevision(StoreError, KeyError):
    """No snapshot, ref or unique prefix matches `rev`."""

    def __init__(self, rev: str) -> None:
        super().__init__(rev)
        self.rev = rev

    def __str__(self) -> str:
        return f"unknown revision {self.rev!r}"


class AmbiguousRevision(StoreError):
    """A hex prefix matches more than one snapshot; `candidates` lists (some of) them."""

    def __init__(self, rev: str, candidates: Sequence[str]) -> None:
        super().__init__(rev, list(candidates))
        self.rev = rev
        self.candidates = list(candidates)

    def __str__(self) -> str:
        shown = ", ".join(c.removeprefix("sha256:")[:12] for c in self.candidates[:5])
        more = "" if len(self.candidates) <= 5 else f", ... ({len(self.candidates)} in all)"
        return f"revision {self.rev!r} is ambiguous: {shown}{more}"


class MissingObject(StoreError, KeyError):
    """An object a caller or a manifest names is not in the store (`kind`: page, blob, snapshot)."""

    def __init__(self, kind: str, digest: str) -> None:
        super().__init__(kind, digest)
        self.kind = kind
        self.digest = digest

    def __str__(self) -> str:
        return f"missing {self.kind} {self.digest}"


class RefConflict(StoreError):
    """A compare-and-swap on a ref failed: someone else moved it first."""

    def __init__(self, name: str, expected: str | None, actual: str | None) -> None:
        super().__init__(name, expected, actual)
        self.name = name
        self.expected = expected
        self.actual = actual

    def __str__(self) -> str:
        return (
            f"ref {self.name!r} changed concurrently: expected {self.expected or 'no ref'}, "
            f"found {self.actual or 'no ref'}"
        )


class RefIsHead(StoreError):
    """A delete of the ref HEAD points to, without being allowed to (`pf ref delete -f`,
    `?force=true`): HEAD would point nowhere."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"HEAD points to {self.name!r}"


class StoreFull(StoreError):
    """The disk (or quota) is full; the transaction was rolled back and nothing was lost."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(path, detail)
        self.path = path
        self.detail = detail

    def __str__(self) -> str:
        return f"store {self.path} is full: {self.detail}; nothing was written"


class UnsupportedFormat(StoreError):
    """A store or manifest uses a format this code does not know; it must not be touched."""

    def __init__(self, found: str) -> None:
        super().__init__(found)
        self.found = found

    def __str__(self) -> str:
        return f"unsupported store format {self.found!r}; refusing to read or write it"


class CorruptPage(StoreError):
    """Stored bytes do not hash to their key (`actual` is the digest the bytes have).

    `kind` says which kind of object (page, blob, snapshot): verification is the same for all.
    """

    def __init__(self, digest: str, actual: str, kind: str = "page") -> None:
        super().__init__(digest, actual)
        self.digest = digest
        self.actual = actual
        self.kind = kind

    def __str__(self) -> str:
        return f"corrupt {self.kind} {self.digest}: its bytes hash to {self.actual}"


class MalformedObject(StoreError):
    """Stored bytes that hash to their key but cannot be what their record holds (token ids whose
    length is not a multiple of 4): written wrong, not damaged at rest."""

    def __init__(self, digest: str, detail: str, kind: str = "blob") -> None:
        super().__init__(digest, detail, kind)
        self.digest = digest
        self.detail = detail
        self.kind = kind

    def __str__(self) -> str:
        return f"malformed {self.kind} {self.digest}: {self.detail}"


class PageSizeMismatch(StoreError):
    """A page is not the size the caller's buffer layout expects (wrong engine geometry)."""

    def __init__(self, digest: str, expected: int, actual: int) -> None:
        super().__init__(digest, expected, actual)
        self.digest = digest
        self.expected = expected
        self.actual = actual

    def __str__(self) -> str:
        return f"page {self.digest} has {self.actual} bytes, expected {self.expected}"


class InvalidArgument(StoreError, ValueError):
    """A caller's value breaks a rule of the store: a name, a count, a digest, an age. The CLI and
    the HTTP routes report every one as the caller's mistake."""


class InvalidName(InvalidArgument):
    """A ref, pin or meta name breaks the naming rules."""

    def __init__(self, name: str, reason: str = "") -> None:
        super().__init__(name, reason)
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        return f"invalid name {self.name!r}{why}"


class InvalidCount(InvalidArgument):
    """A count outside its range, such as the number of fork children."""

    def __init__(self, what: str, value: object, low: int, high: int) -> None:
        super().__init__(what, value, low, high)
        self.what = what
        self.value = value
        self.low = low
        self.high = high

    def __str__(self) -> str:
        return f"{self.what} must be an integer from {self.low} to {self.high}, got {self.value!r}"


class InvalidDigest(InvalidArgument):
    """Not a page or blob digest: 16 bytes, written as 32 lowercase hex digits."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"invalid digest {self.text!r}: a digest is 16 bytes, 32 lowercase hex digits"


class InvalidAge(InvalidArgument):
    """An age such as `--prune 10m` could not be parsed."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"invalid age {self.text!r} (examples: now, 90s, 10m, 1h30m, 2.weeks, 30d, never)"


class StoreNotFound(StoreError, FileNotFoundError):
    """A read-only open found no store at `path` (read-only opens never create one)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path

    def __str__(self) -> str:
        return f"no store at {self.path}"


class ReadOnlyStore(StoreError):
    """A write was attempted through a store opened with `readonly=True`."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path

    def __str__(self) -> str:
        return f"store {self.path} is open read-only"
