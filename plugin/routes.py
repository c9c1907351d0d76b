"""HTTP routes under ``/v1/processfork/`` (vLLM endpoint plugin ``processfork``).

Runs in the API server process.  Routes live under ``/v1`` so vLLM's ``--api-key``
middleware guards them like every OpenAI route.  Handlers stay thin: parsing and
error shaping here, the work in ``control.Control``.
"""

from __future__ import annotations

import difflib
import json
from argparse import Namespace
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from processfork.store import Store, StoreError, documents, validate_ref_name
from pydantic import BaseModel, ValidationError
from starlette.datastructures import State

from .api_errors import ApiError, from_store_error
from .api_models import CheckoutBody, ForkBody, RepairBody, SnapshotBody
from .chat_render import render_chat
from .connector import store_path_from_config
from .control import Control
from .repair import repair_snapshot

__all__ = ["PREFIX", "ProcessForkEndpoints"]

PREFIX = "/v1/processfork"

Handler = Callable[..., Awaitable[Any]]


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw or b"null", parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"request body is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise ApiError(400, "invalid_json", "request body is nested too deeply") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "request body must be a JSON object")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, "invalid_json", "request body holds a lone UTF-16 surrogate "
                                            f"({exc.object[exc.start:exc.end]!a})") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        unknown = [str(e["loc"][0]) for e in exc.errors() if e.get("type") == "extra_forbidden"]
        if unknown:
            raise ApiError(400, "invalid_request", unknown_field_message(unknown, model)) from exc
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(422, "invalid_request", f"{where}: {first.get('msg')}") from exc


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


async def _guard(fn: Handler, *args: Any) -> JSONResponse:
    """Run a handler; every failure becomes the JSON error shape, never a bare 500."""
    try:
        return JSONResponse(await fn(*args))
    except ApiError as exc:
        return _error_response(exc)
    except StoreError as exc:
        return _error_response(from_store_error(exc))


def build_router() -> APIRouter:
    router = APIRouter(prefix=PREFIX)

    @router.post("/snapshot")
    async def snapshot(request: Request) -> JSONResponse:
        async def run() -> Any:
            control = _control(request)
            body = await _parse(request, SnapshotBody)
            if body.messages is not None:
                ids = await render_chat(request, body)
                if ids is not None:
                    body = body.model_copy(update={"token_ids": ids, "messages": None})
            return await control.snapshot(body)

        return await _guard(run)

    @router.post("/fork")
    async def fork(request: Request) -> JSONResponse:
        async def run() -> Any:
            return await _control(request).fork(await _parse(request, ForkBody))

        return await _guard(run)

    @router.post("/checkout")
    async def checkout(request: Request) -> JSONResponse:
        async def run() -> Any:
            return await _control(request).checkout(await _parse(request, CheckoutBody))

        return await _guard(run)

    @router.post("/repair")
    async def repair(request: Request) -> JSONResponse:
        async def run() -> Any:
            control = _control(request)
            return await repair_snapshot(control, (await _parse(request, RepairBody)).cid)

        return await _guard(run)

    @router.get("/snapshots/{rev:path}")
    async def show(request: Request, rev: str) -> JSONResponse:
        async def run() -> Any:
            control = _control(request)

            def build(store: Store) -> dict[str, Any]:
                cid = store.resolve(rev)
                names = documents.refs_by_cid(store.list_refs()).get(cid, [])
                return documents.snapshot_doc(store, cid, store.get_snapshot(cid), refs=names)

            return await control._run(build, control.store)

        return await _guard(run)

    @router.get("/log")
    async def log(
        request: Request, ref: str | None = None, limit: int | None = None, all: bool = False
    ) -> JSONResponse:
        async def run() -> Any:
            control = _control(request)
            if limit is not None and limit < 1:
                raise ApiError(422, "invalid_request", "limit must be at least 1")

            def build(store: Store) -> dict[str, Any]:
                rev = ref if ref is not None else (None if all else "HEAD")
                entries = store.log(rev, limit=limit, all_refs=all)
                return documents.log_doc(entries, head=documents.head_doc(store))

            return await control._run(build, control.store)

        return await _guard(run)

    @router.get("/refs")
    async def refs(request: Request) -> JSONResponse:
        async def run() -> Any:
            control = _control(request)
            return await control._run(documents.refs_doc, control.store)

        return await _guard(run)

    @router.delete("/refs/{name:path}")
    async def delete_ref(request: Request, name: str, force: bool = False) -> JSONResponse:
        async def run() -> Any:
            control = _control(request)
            await control._run(validate_ref_name, name)  # 400 before the name reaches LMDB
            old = await control._run(control.store.get_ref, name)
            if old is None:
                raise ApiError(404, "not_found", f"no ref named {name!r}")
            head = await control._run(control.store.head)
            if head.ref == name and not force:
                raise ApiError(
                    409, "ref_is_head", f"HEAD points to {name!r}; pass force=true to delete it"
                )
            await control._run(control.store.delete_ref, name, expected_old=old)
            return {"deleted": name, "cid": old}

        return await _guard(run)

    @router.get("/status")
    async def status(request: Request) -> JSONResponse:
        async def run() -> Any:
            control = _control(request)
            store_status = await control._run(control.store.status)
            record = await control.engine_record()
            return {
                "store": documents.to_jsonable(store_status),
                "engine": {
                    "fingerprint": record["fingerprint"],
                    "num_blocks": record.get("num_blocks"),
                    "page_bytes": record.get("page_bytes"),
                    "block_size": control.block_size,
                    "max_model_len": control.max_model_len,
                    "max_num_batched_tokens": control.max_num_batched_tokens,
                },
            }

        return await _guard(run)

    return router


class ProcessForkEndpoints:
    """Entry point for ``vllm.endpoint_plugins`` (enabled by ``VLLM_PLUGINS=processfork``)."""

    name = "processfork"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(build_router())

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
