"""HTTP errors of the control plane, in the ``{"error": {"type", "message"}}`` shape."""

from __future__ import annotations

from processfork.store import (
    AmbiguousRevision,
    CorruptPage,
    InvalidArgument,
    MalformedObject,
    MissingObject,
    RefConflict,
    RefIsHead,
    StoreError,
    StoreFull,
    UnknownRevision,
    UnsupportedFormat,
)

__all__ = ["ApiError", "from_store_error"]


#: Longer messages are cut: they may quote what the client sent (a 10 KB ref name).
MAX_MESSAGE_CHARS = 1000


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` on one line (every run of whitespace one space), cut to `limit` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 32] + f"... ({len(text):,} characters)"


class ApiError(Exception):
    """An error with its HTTP status and a stable machine-readable type."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        message = one_line(message)
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"type": self.type, "message": self.message}}


def from_store_error(exc: StoreError) -> ApiError:
    """Map a store error to the status a client should see."""
    if isinstance(exc, UnknownRevision):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, (AmbiguousRevision, InvalidArgument)):
        return ApiError(400, "invalid_request", str(exc))
    if isinstance(exc, RefConflict):
        return ApiError(409, "ref_conflict", str(exc))
    if isinstance(exc, RefIsHead):
        return ApiError(409, "ref_is_head", f"{exc}; pass force=true to delete it")
    if isinstance(exc, StoreFull):
        return ApiError(507, "store_full", str(exc))
    if isinstance(exc, UnsupportedFormat):
        return ApiError(409, "unsupported_format", str(exc))
    if isinstance(exc, (CorruptPage, MalformedObject, MissingObject)):
        return ApiError(500, "integrity_error", str(exc))
    return ApiError(500, "store_error", str(exc))
