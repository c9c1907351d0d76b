"""Push, fetch and pull over HTTP: the server does the work of `pf push/fetch/pull` on its store.

Runs in the API server. Each operation runs on a worker thread (the event loop keeps serving
completions meanwhile) through the same calls as the CLI (`processfork.store.remote.porcelain`),
and answers what the CLI's `--json` prints. The remote is the server's own (`pf serve --remote`)
or one the store names (`pf remote add`); never a URL from the request.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from processfork.store import StoreError
from processfork.store.remote import (
    NonFastForward,
    RemoteError,
    RemoteFormatUnsupported,
    RemoteUnreachable,
    UnknownRemote,
    validate_remote_name,
)

from .api_errors import ApiError, from_store_error
from .api_models import (
    FetchBody,
    FetchResponse,
    PullBody,
    PullResponse,
    PushBody,
    PushResponse,
)

if TYPE_CHECKING:
    from .control import Control

__all__ = ["fetch", "pull", "push"]

T = TypeVar("T")


def _remote(control: Control, name: str | None) -> str:
    """What porcelain takes: a remote's name, or the server's own remote URL."""
    if name is None:
        if control.remote_url is None:
            raise ApiError(409, "no_remote", "this server has no remote: start it with `pf serve "
                                             "--remote REMOTE`, or name one of the store's remotes")
        return control.remote_url
    if name.startswith("s3://"):
        raise ApiError(400, "invalid_request", "remote: name one of the store's remotes (`pf "
                                               "remote add`); the server takes no URL from a client")
    try:
        validate_remote_name(name)
    except StoreError as exc:
        raise ApiError(400, "invalid_request", f"remote: {exc}") from None
    return name


async def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except UnknownRemote as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except NonFastForward as exc:
        raise ApiError(409, "non_fast_forward", str(exc)) from None
    except RemoteFormatUnsupported as exc:
        raise ApiError(409, "unsupported_format", str(exc)) from None
    except RemoteUnreachable as exc:
        raise ApiError(502, "remote_unreachable", str(exc)) from None
    except StoreError as exc:
        if isinstance(exc, RemoteError) and type(exc) is RemoteError:
            raise ApiError(502, "remote_error", str(exc)) from None
        raise from_store_error(exc) from exc


def _doc(result: Any) -> dict[str, Any]:
    return dataclasses.asdict(result)


async def push(control: Control, body: PushBody) -> PushResponse:
    from processfork.store.remote.porcelain import push_refs

    if body.all and body.refs:
        raise ApiError(400, "invalid_request", "refs and all: name the refs, or push all of them")
    remote = _remote(control, body.remote)
    result = await _run(push_refs, control.store, remote, body.refs or (), all_refs=body.all,
                        force=body.force)
    return PushResponse.model_validate(_doc(result))


async def fetch(control: Control, body: FetchBody) -> FetchResponse:
    from processfork.store.remote.porcelain import fetch_remote

    remote = _remote(control, body.remote)
    result = await _run(fetch_remote, control.store, remote, body.refs or ())
    return FetchResponse.model_validate(_doc(result))


async def pull(control: Control, body: PullBody) -> PullResponse:
    from processfork.store.remote.porcelain import pull as pull_remote

    remote = _remote(control, body.remote)
    result = await _run(pull_remote, control.store, remote, body.refs or (), force=body.force)
    return PullResponse.model_validate(
        {"fetch": _doc(result.fetch), "refs": [_doc(m) for m in result.refs]})
