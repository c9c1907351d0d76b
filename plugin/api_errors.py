"""HTTP errors of the control plane, in the ``{"error": {"type", "message"}}`` shape."""

from __future__ import annotations

from processfork.store import (
    AmbiguousRevision,
    CorruptPage,
    InvalidName,
    MissingObject,
    RefConflict,
    StoreError,
    StoreFull,
    UnknownRevision,
    UnsupportedFormat,
)

__all__ = ["ApiError", "from_store_error"]


class ApiError(Exception):
    """An error with its HTTP status and a stable machine-readable type."""

    def __init__(self, status: int, type_: str, message: str) -> None:
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
    if isinstance(exc, (AmbiguousRevision, InvalidName)):
        return ApiError(400, "invalid_request", str(exc))
    if isinstance(exc, RefConflict):
        return ApiError(409, "ref_conflict", str(exc))
    if isinstance(exc, StoreFull):
        return ApiError(507, "store_full", str(exc))
    if isinstance(exc, UnsupportedFormat):
        return ApiError(409, "unsupported_format", str(exc))
    if isinstance(exc, (CorruptPage, MissingObject)):
        return ApiError(500, "integrity_error", str(exc))
    return ApiError(500, "store_error", str(exc))
