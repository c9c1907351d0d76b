"""Exit codes and the CLI's own errors; `main()` turns every exception into one line through `describe`.

Exit codes are a small fixed set, never an HTTP status: scripts branch on "my mistake" (1), "the server,
engine or machine failed" (2) and "the store's data is damaged" (3).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import IntEnum

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
    StoreNotFound,
    UnknownRevision,
    UnsupportedFormat,
)

__all__ = [
    "CliError",
    "ExitCode",
    "IntegrityProblems",
    "Problem",
    "ServerError",
    "ServerUnreachable",
    "UserError",
    "describe",
]


class ExitCode(IntEnum):
    """The process exit codes of `pf` (docs/cli.md lists them for users)."""

    OK = 0
    USER = 1
    SERVER = 2
    INTEGRITY = 3


class CliError(Exception):
    """An error the CLI reports as one line; `hint` tells the user what to try next."""

    exit_code: ExitCode = ExitCode.USER

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UserError(CliError):
    """Bad input the parser could not catch: a bad age, a negative count, a missing file."""


class IntegrityProblems(CliError):
    """fsck found problems: the data was already printed, this only sets the exit code."""

    exit_code = ExitCode.INTEGRITY

    def __init__(self, count: int) -> None:
        super().__init__(f"fsck found {count} problem{'s' if count != 1 else ''}")
        self.count = count


class RepairIncomplete(CliError):
    """`pf repair` could not repair everything: what it did was already printed."""

    exit_code = ExitCode.INTEGRITY

    def __init__(self, count: int) -> None:
        super().__init__(
            f"{count} snapshot{'s' if count != 1 else ''} could not be repaired",
            hint="their token ids or page tables are damaged: restore the store from a copy",
        )


class ServerError(CliError):
    """The server answered with an error; 4xx is the caller's mistake, anything else the server's."""

    def __init__(
        self, status: int, error_type: str, message: str, url: str, *, hint: str | None = None
    ) -> None:
        kind = "" if error_type == message else f" {error_type}"
        super().__init__(f"{message} (HTTP {status}{kind} from {url})", hint=hint)
        self.status = status
        self.error_type = error_type
        self.server_message = message
        self.url = url
        # The error's type decides, as the same error raised locally would: an integrity error
        # is exit 3 and a full store exit 2 whatever status carried them.
        by_type = _EXIT_BY_TYPE.get(error_type)
        if by_type is not None:
            self.exit_code = by_type
        else:
            self.exit_code = ExitCode.USER if 400 <= status < 500 else ExitCode.SERVER
        if self.hint is None and (error_type != "not_found" or "revision" in message):
            self.hint = _HINT_BY_TYPE.get(error_type)


_UNKNOWN_REVISION_HINT = "`pf refs` lists names, `pf log --all` lists snapshots"
#: Exit codes of the control plane's error types (docs/http-api.md), as their local errors have.
_EXIT_BY_TYPE: dict[str, ExitCode] = {
    "not_found": ExitCode.USER,
    "invalid_request": ExitCode.USER,
    "invalid_json": ExitCode.USER,
    "ref_conflict": ExitCode.USER,
    "incompatible_snapshot": ExitCode.USER,
    "integrity_error": ExitCode.INTEGRITY,
    "unsupported_format": ExitCode.INTEGRITY,
    "unrepairable": ExitCode.INTEGRITY,
    "store_full": ExitCode.SERVER,
    "store_error": ExitCode.SERVER,
}
_HINT_BY_TYPE: dict[str, str] = {
    "not_found": _UNKNOWN_REVISION_HINT,
    "ref_conflict": "check `pf refs` and retry",
    "integrity_error": "run `pf fsck` for a full report",
    "unsupported_format": "run `pf fsck` for a full report",
    "store_full": "free disk space, or run `pf gc`",
}


class ServerUnreachable(CliError):
    """No HTTP answer at all: refused, timed out, DNS failure."""

    exit_code = ExitCode.SERVER

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"cannot reach {url}: {reason}",
            hint=f"is `pf serve` running at {url}? --server or PF_SERVER name another URL",
        )
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class Problem:
    """What `main()` prints and returns for one exception."""

    exit_code: ExitCode
    message: str
    hint: str | None = None
    show_debug_hint: bool = False


_STORE_USER_ERRORS = (UnknownRevision, AmbiguousRevision, InvalidArgument, RefConflict, RefIsHead)
_STORE_INTEGRITY_ERRORS = (MissingObject, CorruptPage, MalformedObject, UnsupportedFormat)


def describe(exc: BaseException) -> Problem:
    """Map an exception to its exit code and one-line message.

    Store errors carry one-line `str()`s by contract, so their text is used as is.
    """
    if isinstance(exc, CliError):
        return Problem(exc.exit_code, exc.message, exc.hint)
    if type(exc).__module__ == "processfork.store.remote.errors":
        return _describe_remote_error(exc)
    if isinstance(exc, AmbiguousRevision):
        return Problem(ExitCode.USER, str(exc), "give more hex digits or a ref name")
    if isinstance(exc, UnknownRevision):
        return Problem(ExitCode.USER, str(exc), _UNKNOWN_REVISION_HINT)
    if isinstance(exc, StoreNotFound):
        return Problem(
            ExitCode.USER,
            str(exc),
            "pass --store DIR or set PF_STORE; a store is created by its first snapshot",
        )
    if isinstance(exc, RefConflict):
        return Problem(ExitCode.USER, str(exc), "check `pf refs` and retry")
    if isinstance(exc, _STORE_USER_ERRORS):
        return Problem(ExitCode.USER, str(exc))
    if isinstance(exc, _STORE_INTEGRITY_ERRORS):
        return Problem(ExitCode.INTEGRITY, str(exc), "run `pf fsck` for a full report")
    if isinstance(exc, StoreFull):
        return Problem(ExitCode.SERVER, str(exc), "free disk space, or run `pf gc`")
    if isinstance(exc, StoreError):
        return Problem(ExitCode.SERVER, str(exc), show_debug_hint=True)
    if isinstance(exc, OSError):
        return _describe_os_error(exc)
    name = type(exc).__module__.split(".")[0]
    if name == "lmdb":
        return Problem(ExitCode.SERVER, f"store error: {exc}", show_debug_hint=True)
    return Problem(
        ExitCode.SERVER, f"internal error: {type(exc).__name__}: {exc}", show_debug_hint=True
    )


def _describe_remote_error(exc: BaseException) -> Problem:
    """Errors of remotes (loaded only when one is raised: `pf log` never imports them)."""
    from processfork.store.remote.errors import (
        CorruptRemoteObject,
        NonFastForward,
        RemoteFormatUnsupported,
        RemoteUnreachable,
    )

    if isinstance(exc, NonFastForward):
        return Problem(ExitCode.USER, str(exc))
    if isinstance(exc, RemoteUnreachable):
        return Problem(
            ExitCode.SERVER, str(exc),
            "check AWS_ENDPOINT_URL, the AWS credentials and the bucket; `pf remote list` shows URLs",
        )
    if isinstance(exc, CorruptRemoteObject):
        return Problem(
            ExitCode.INTEGRITY, str(exc),
            "push the snapshot again from a store that holds it intact (`pf fsck` checks one)",
        )
    if isinstance(exc, RemoteFormatUnsupported):
        return Problem(ExitCode.INTEGRITY, str(exc), "use a pf version that knows this format")
    if isinstance(exc, InvalidArgument):
        return Problem(ExitCode.USER, str(exc))
    return Problem(ExitCode.SERVER, str(exc), show_debug_hint=True)


def _describe_os_error(exc: OSError) -> Problem:
    where = f": {exc.filename}" if exc.filename else ""
    text = exc.strerror or str(exc)
    if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR):
        return Problem(ExitCode.USER, f"{text}{where}")
    return Problem(ExitCode.SERVER, f"{text}{where}", show_debug_hint=True)
