"""HTTP routes under ``/v1/processfork/`` (vLLM endpoint plugin ``processfork``).

Runs in the API server process.  Routes live under ``/v1`` so vLLM's ``--api-key``
middleware guards them like every OpenAI route.  Handlers stay thin: parsing and
error shaping here, the work in ``control.Control``.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import re
from argparse import Namespace
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from processfork.store import (
    RefIsHead,
    Store,
    StoreError,
    UnknownRevision,
    documents,
    validate_ref_name,
)
from pydantic import BaseModel, ValidationError
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import State
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from vllm.logger import init_logger

from . import remote_ops
from .api_errors import ApiError, from_store_error
from .api_models import (
    MAX_REVISION_CHARS,
    CheckoutBody,
    CheckoutResponse,
    DeleteRefResponse,
    EngineStatus,
    ErrorResponse,
    FetchBody,
    FetchResponse,
    ForkBody,
    ForkResponse,
    LogResponse,
    PullBody,
    PullResponse,
    PushBody,
    PushResponse,
    RefsResponse,
    RepairBody,
    RepairResponse,
    Reply,
    ResetBody,
    ResetResponse,
    SnapshotBody,
    SnapshotResponse,
    SnapshotSummary,
    StatusResponse,
)
from .chat_render import render_chat
from .connector_config import store_path_from_config
from .control import Control
from .general import share_vllm_log_handlers
from .repair import repair_snapshot
from .session_header import SessionHeader

__all__ = ["PREFIX", "ProcessForkEndpoints", "body_limit"]

logger = init_logger(__name__)

PREFIX = "/v1/processfork"

Handler = Callable[[bytes], Awaitable[Reply]]

#: The error shape, for the OpenAPI document: every route answers its errors so.
_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse}, "5XX": {"model": ErrorResponse},
}


class _AnyPath(Convertor[str]):
    """Like Starlette's ``path``, but also across newlines (a ``%0A`` in a ref name): the route
    then answers for the name instead of falling through to a bare 404."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("pf_path", _AnyPath())


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


#: A JSON escape of a UTF-16 surrogate code unit, \uD800-\uDFFF (see _may_hold_surrogates).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: A request body may hold this many bytes per token of the engine's --max-model-len (a token id
#: takes at most 8 bytes of JSON, a token of text escaped for JSON rarely more than 30), and never
#: less than MIN_BODY_BYTES. A larger body is refused before it is read (413 body_too_large).
BODY_BYTES_PER_TOKEN = 64
MIN_BODY_BYTES = 1 << 20


def body_limit(request: Request) -> int:
    """The largest body this server's routes read, in bytes."""
    control = getattr(request.app.state, "processfork", None)
    max_model_len = getattr(control, "max_model_len", 0) or 0
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_model_len)


def _too_large(limit: int, size: str) -> ApiError:
    # What the client still sends is discarded by the HTTP server as it arrives, never buffered.
    return ApiError(
        413,
        "body_too_large",
        f"request body of {size} is over this server's limit of {limit:,} bytes "
        "(64 bytes per token of --max-model-len, at least 1 MiB)",
    )


async def _read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it is known to be over the limit: by its Content-Length
    before any of it is read, or, sent in chunks, once the bytes read pass the limit."""
    limit = body_limit(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _too_large(limit, f"{int(declared):,} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit, f"more than {limit:,} bytes")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise ApiError(400, "invalid_request", "the client closed the connection before the "
                                               "whole body arrived") from exc
    return b"".join(chunks)


def _may_hold_surrogates(raw: bytes) -> bool:
    """Whether a parsed body may hold a lone UTF-16 surrogate, which only encoding it again finds
    (that costs as much as the parse: the 32K token ids of a long snapshot, too). An ASCII body
    without NUL bytes is UTF-8 (JSON in UTF-16 or 32 has NULs), and there a surrogate can only
    come from a \\uD800-\\uDFFF escape; any other body is checked."""
    if not raw.isascii() or b"\0" in raw:
        return True
    return _SURROGATE_ESCAPE.search(raw) is not None


def _parse(raw: bytes, model: type[BaseModel]) -> Any:
    try:
        data = json.loads(raw or b"null", parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"request body is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise ApiError(400, "invalid_json", "request body is nested too deeply") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "request body must be a JSON object")
    if _may_hold_surrogates(raw):
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(400, "invalid_json", "request body holds a lone UTF-16 surrogate "
                                                f"({exc.object[exc.start:exc.end]!a})") from exc
        except RecursionError as exc:
            raise ApiError(400, "invalid_json", "request body is nested too deeply") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        unknown = [str(e["loc"][0]) for e in exc.errors() if e.get("type") == "extra_forbidden"]
        if unknown:
            raise ApiError(400, "invalid_request", unknown_field_message(unknown, model)) from exc
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(422, "invalid_request", f"{where}: {first.get('msg')}") from exc


def _revision(value: str, what: str) -> str:
    if len(value) > MAX_REVISION_CHARS:
        raise ApiError(422, "invalid_request", f"{what}: a revision has at most "
                                               f"{MAX_REVISION_CHARS} characters, got {len(value):,}")
    return value


def _query_flag(request: Request, name: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``); absent is false."""
    raw = request.query_params.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ApiError(422, "invalid_request", f"{name}: expected true or false, got {raw[:40]!r}")


def _query_limit(request: Request) -> int | None:
    raw = request.query_params.get("limit")
    if raw is None:
        return None
    digits = raw.strip()
    if not (digits.isascii() and digits.isdigit()) or not digits.strip("0"):
        raise ApiError(422, "invalid_request",
                       f"limit: expected a whole number of at least 1, got {raw[:40]!r}")
    digits = digits.lstrip("0")
    return int(digits) if len(digits) <= 18 else 10**18  # more entries than any store holds


def _no_constant(name: str) -> Any:
    """JSON has no NaN or Infinity; Python's parser accepts them unless told not to."""
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def unknown_field_message(names: list[str], model: type[BaseModel]) -> str:
    """``unknown field 'promt' (did you mean 'prompt'?); known fields: ...``"""
    known = sorted(model.model_fields)
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"unknown field {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "; ".join(parts) + f"; known fields: {', '.join(known)}"


def _control(request: Request) -> Control:
    control = getattr(request.app.state, "processfork", None)
    if control is None:
        raise ApiError(
            503,
            "not_configured",
            "this server runs without the ProcessFork KV connector; start it with `pf serve` "
            "or pass --kv-transfer-config (see docs/gpu.md)",
        )
    return control


async def _guard(request: Request, fn: Handler) -> JSONResponse:
    """Read the body (within the limit), run a handler on it and answer its reply; every failure
    becomes the JSON error shape, never a bare 500. A reply is validated when it is built (a
    reply that does not fit its model is a bug: 500 internal_error)."""
    try:
        return JSONResponse((await fn(await _read_body(request))).to_json())
    except ApiError as exc:
        return _error_response(exc)
    except StoreError as exc:
        return _error_response(from_store_error(exc))
    except Exception as exc:  # a bug: still the error shape, with the traceback in the log
        logger.exception("%s %s failed", request.method, request.url.path)
        return _error_response(ApiError(500, "internal_error", f"{type(exc).__name__}: {exc}"))


def build_router() -> APIRouter:
    router = APIRouter(prefix=PREFIX)

    @router.post("/snapshot", response_model=SnapshotResponse, responses=_ERRORS)
    async def snapshot(request: Request) -> JSONResponse:
        async def run(raw: bytes) -> SnapshotResponse:
            control = _control(request)
            body = _parse(raw, SnapshotBody)
            if body.messages is not None:
                ids = await render_chat(request, body)
                if ids is not None:
                    body = body.model_copy(update={"token_ids": ids, "messages": None})
            return await control.snapshot(body)

        return await _guard(request, run)

    @router.post("/fork", response_model=ForkResponse, responses=_ERRORS)
    async def fork(request: Request) -> JSONResponse:
        async def run(raw: bytes) -> ForkResponse:
            return await _control(request).fork(_parse(raw, ForkBody))

        return await _guard(request, run)

    @router.post("/checkout", response_model=CheckoutResponse, responses=_ERRORS)
    async def checkout(request: Request) -> JSONResponse:
        async def run(raw: bytes) -> CheckoutResponse:
            return await _control(request).checkout(_parse(raw, CheckoutBody))

        return await _guard(request, run)

    @router.post("/repair", response_model=RepairResponse, responses=_ERRORS)
    async def repair(request: Request) -> JSONResponse:
        async def run(raw: bytes) -> RepairResponse:
            control = _control(request)
            return await repair_snapshot(control, _parse(raw, RepairBody).cid)

        return await _guard(request, run)

    @router.get("/snapshots/{rev:pf_path}", response_model=SnapshotSummary, responses=_ERRORS)
    async def show(request: Request) -> JSONResponse:
        rev = request.path_params["rev"]

        async def run(_raw: bytes) -> SnapshotSummary:
            control = _control(request)
            _revision(rev, "rev")

            def build(store: Store) -> dict[str, Any]:
                cid = store.resolve(rev)
                names = documents.refs_by_cid(store.list_refs()).get(cid, [])
                return documents.snapshot_doc(store, cid, store.get_snapshot(cid), refs=names)

            return SnapshotSummary.model_validate(await control._run(build, control.store))

        return await _guard(request, run)

    @router.get("/log", response_model=LogResponse, responses=_ERRORS)
    async def log(request: Request) -> JSONResponse:
        # Query parameters are read here, not by FastAPI: its errors are multi-line and not in
        # this API's error shape.
        async def run(_raw: bytes) -> LogResponse:
            control = _control(request)
            ref = request.query_params.get("ref")
            if ref is not None:
                _revision(ref, "ref")
            limit = _query_limit(request)
            all_refs = _query_flag(request, "all")

            def build(store: Store) -> dict[str, Any]:
                rev = ref if ref is not None else (None if all_refs else "HEAD")
                entries = store.log(rev, limit=limit, all_refs=all_refs)
                return documents.log_doc(entries, head=documents.head_doc(store))

            return LogResponse.model_validate(await control._run(build, control.store))

        return await _guard(request, run)

    @router.get("/refs", response_model=RefsResponse, responses=_ERRORS)
    async def refs(request: Request) -> JSONResponse:
        async def run(_raw: bytes) -> RefsResponse:
            control = _control(request)
            return RefsResponse.model_validate(await control._run(documents.refs_doc, control.store))

        return await _guard(request, run)

    @router.delete("/refs/{name:pf_path}", response_model=DeleteRefResponse, responses=_ERRORS)
    async def delete_ref(request: Request) -> JSONResponse:
        name = request.path_params["name"]

        async def run(_raw: bytes) -> DeleteRefResponse:
            control = _control(request)
            force = _query_flag(request, "force")
            await control._run(validate_ref_name, name)  # 400 before the name reaches LMDB
            try:  # not control._run: it would turn these into generic errors first
                old = await asyncio.to_thread(control.store.delete_ref, name, allow_head=force)
            except UnknownRevision:
                raise ApiError(404, "not_found", f"no ref named {name!r}") from None
            except RefIsHead as exc:
                raise ApiError(409, "ref_is_head", f"{exc}; pass force=true to delete it") from None
            return DeleteRefResponse(deleted=name, cid=old)

        return await _guard(request, run)

    @router.post("/reset", response_model=ResetResponse, responses=_ERRORS)
    async def reset(request: Request) -> JSONResponse:
        async def run(raw: bytes) -> ResetResponse:
            control = _control(request)
            body = _parse(raw, ResetBody)
            await control._run(validate_ref_name, body.ref)  # 400 before the name reaches LMDB
            store = control.store

            def move() -> tuple[str, str]:
                current = store.get_ref(body.ref)
                if current is None:
                    raise UnknownRevision(body.ref)
                # Resolved before the move: `NAME~3` names where the ref is now.
                expected = store.resolve(body.old) if body.old is not None else current
                target = store.resolve(body.rev)
                store.set_ref(body.ref, target, expected_old=expected, action="reset",
                              message=f"reset: {body.rev}")
                return target, current

            cid, old = await control._run(move)
            return ResetResponse(ref=body.ref, cid=cid, old=old)

        return await _guard(request, run)

    @router.post("/push", response_model=PushResponse, responses=_ERRORS)
    async def push(request: Request) -> JSONResponse:
        async def run(raw: bytes) -> PushResponse:
            return await remote_ops.push(_control(request), _parse(raw, PushBody))

        return await _guard(request, run)

    @router.post("/fetch", response_model=FetchResponse, responses=_ERRORS)
    async def fetch(request: Request) -> JSONResponse:
        async def run(raw: bytes) -> FetchResponse:
            return await remote_ops.fetch(_control(request), _parse(raw, FetchBody))

        return await _guard(request, run)

    @router.post("/pull", response_model=PullResponse, responses=_ERRORS)
    async def pull(request: Request) -> JSONResponse:
        async def run(raw: bytes) -> PullResponse:
            return await remote_ops.pull(_control(request), _parse(raw, PullBody))

        return await _guard(request, run)

    @router.get("/status", response_model=StatusResponse, responses=_ERRORS)
    async def status(request: Request) -> JSONResponse:
        async def run(_raw: bytes) -> StatusResponse:
            control = _control(request)
            store_status = await control._run(control.store.status)
            record = await control.engine_record()
            return StatusResponse(
                store=store_status,
                engine=EngineStatus(
                    fingerprint=record.fingerprint,
                    num_blocks=record.num_blocks,
                    page_bytes=record.page_bytes,
                    block_size=control.block_size,
                    max_model_len=control.max_model_len,
                    max_num_batched_tokens=control.max_num_batched_tokens,
                ),
            )

        return await _guard(request, run)

    # Last: any other method or path under the prefix gets this API's error shape, not FastAPI's.
    known = [(route.path_regex, route.methods) for route in router.routes]

    async def no_route(request: Request) -> JSONResponse:
        async def run(_raw: bytes) -> Reply:
            path = request.url.path
            allowed = sorted({m for regex, methods in known if regex.match(path) for m in methods})
            if allowed:
                raise ApiError(405, "method_not_allowed",
                               f"{request.method} is not allowed here; use {', '.join(allowed)}")
            raise ApiError(404, "not_found", f"no route {request.method} {path[:200]!r}; "
                                             "see docs/http-api.md for the routes")

        return await _guard(request, run)

    for path in (PREFIX, PREFIX + "/{rest:pf_path}"):  # an ASGI endpoint: every method matches
        router.routes.append(Route(path, _AsgiEndpoint(no_route), include_in_schema=False))
    return router


class _AsgiEndpoint:
    """A request handler as an ASGI app, so that its route matches every method (Starlette
    limits a function endpoint to the methods listed, and answers others in its own shape)."""

    def __init__(self, handler: Callable[[Request], Awaitable[JSONResponse]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        response = await self.handler(Request(scope, receive))
        await response(scope, receive, send)


class ProcessForkEndpoints:
    """Entry point for ``vllm.endpoint_plugins`` (enabled by ``VLLM_PLUGINS=processfork``)."""

    name = "processfork"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        # vLLM configures its logging after the API server loads the general plugins: our
        # records reach the server log only if they share its handlers, which exist by now.
        share_vllm_log_handlers()
        app.include_router(build_router())
        # X-Processfork-Session on /v1/completions and /v1/chat/completions (session_header.py).
        app.add_middleware(SessionHeader)

    async def init_state(
        self, engine_client: Any, state: State, args: Namespace
    ) -> None:
        if engine_client is None:
            return
        kv_config = engine_client.vllm_config.kv_transfer_config
        if kv_config is None or kv_config.kv_connector != "ProcessForkConnector":
            state.processfork = None
            return
        store = store_path_from_config(dict(kv_config.kv_connector_extra_config or {}))
        state.processfork = Control(engine_client, store, kv_config.engine_id)
