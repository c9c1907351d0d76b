"""Errors of remotes: each says which remote, ref or object, in one line."""

from __future__ import annotations

from processfork.store.errors import CorruptPage, InvalidArgument, StoreError

__all__ = [
    "CorruptRemoteObject",
    "InvalidRemoteUrl",
    "NonFastForward",
    "RemoteError",
    "RemoteExists",
    "RemoteFormatUnsupported",
    "RemoteUnreachable",
    "UnknownRemote",
    "UnknownRemoteRef",
]


class RemoteError(StoreError):
    """The object storage answered with an error, or with something that is not a remote."""


class RemoteUnreachable(RemoteError):
    """No answer from the object storage, or an answer that refuses access (credentials)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason)
        self.url = url
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot use remote {self.url}: {self.reason}"


class RemoteFormatUnsupported(RemoteError):
    """The remote records a layout this implementation does not understand: never written."""

    def __init__(self, url: str, found: str) -> None:
        super().__init__(url, found)
        self.url = url
        self.found = found

    def __str__(self) -> str:
        return f"remote {self.url} has unsupported format {self.found}; refusing to write it"


class CorruptRemoteObject(CorruptPage):
    """An object read from a remote does not hash to its address; nothing of it was stored."""

    def __init__(self, url: str, digest: str, actual: str, kind: str) -> None:
        super().__init__(digest, actual, kind)
        self.url = url

    def __str__(self) -> str:
        return (
            f"corrupt {self.kind} {self.digest} on remote {self.url}: its bytes hash to "
            f"{self.actual}; nothing was stored"
        )


class NonFastForward(StoreError):
    """A push or pull that would lose the other side's snapshots: refused unless forced."""

    def __init__(self, ref: str, detail: str) -> None:
        super().__init__(ref, detail)
        self.ref = ref
        self.detail = detail

    def __str__(self) -> str:
        return f"ref {self.ref!r} not updated: {self.detail}"


class InvalidRemoteUrl(InvalidArgument):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason)
        self.url = url
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid remote URL {self.url!r}: {self.reason}"


class UnknownRemote(InvalidArgument):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no remote named {self.name!r}"


class UnknownRemoteRef(InvalidArgument):
    def __init__(self, url: str, ref: str) -> None:
        super().__init__(url, ref)
        self.url = url
        self.ref = ref

    def __str__(self) -> str:
        return f"remote {self.url} has no ref {self.ref!r}"


class RemoteExists(InvalidArgument):
    def __init__(self, name: str, url: str) -> None:
        super().__init__(name, url)
        self.name = name
        self.url = url

    def __str__(self) -> str:
        return f"remote {self.name!r} already exists ({self.url})"
