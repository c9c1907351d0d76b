"""The HTTP routes' replies: their models take the documents the routes answer and give back the
same JSON, byte for byte, and FastAPI's OpenAPI document names them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from processfork.plugin.api_errors import ApiError
from processfork.plugin.api_models import (
    EngineStatus,
    ErrorResponse,
    LogResponse,
    RefsResponse,
    RepairResponse,
    SnapshotSummary,
    StatusResponse,
)
from processfork.store import Store, documents
from processfork.store.digest import cid_key
from pydantic import ValidationError
from test_cli_support import History, build_history
from test_jobs import FINGERPRINT


@pytest.fixture
def history(tmp_path: Path) -> History:
    return build_history(tmp_path / "store")


def _wire(data: Any) -> str:
    """What a route sends: Starlette's JSONResponse encoding."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def test_read_replies_send_the_documents_unchanged(history: History) -> None:
    with Store(history.path) as store:
        # The ref `main` names a snapshot the store no longer has (pf fsck reports it).
        gone = store.get_ref("main")
        store.env.write(lambda txn: txn.delete(cid_key(gone), db=store.dbs["snapshots"]))
        cids = [history.base, history.forks[1]]
        docs = [documents.snapshot_doc(store, cid, store.get_snapshot(cid), refs=["r"])
                for cid in cids]
        log = documents.log_doc(store.log(history.forks[0]), head=documents.head_doc(store))
        refs = documents.refs_doc(store)
    assert any(doc["fork"] for doc in docs) and any(not doc["fork"] for doc in docs)
    assert any(row["missing"] for row in refs["refs"])
    for model, doc in [*((SnapshotSummary, d) for d in docs), (LogResponse, log), (RefsResponse, refs)]:
        assert _wire(model.model_validate(doc).to_json()) == _wire(doc)


def test_the_status_reply_sends_the_store_status_as_before(history: History) -> None:
    with Store(history.path) as store:
        status = store.status()
    engine = EngineStatus(fingerprint=FINGERPRINT, num_blocks=512, page_bytes=8192, block_size=16,
                          max_model_len=2048, max_num_batched_tokens=256)
    sent = StatusResponse(store=status, engine=engine).to_json()
    assert _wire(sent["store"]) == _wire(documents.to_jsonable(status))
    assert _wire(sent["engine"]["fingerprint"]) == _wire(dict(sorted(FINGERPRINT.to_json().items())))
    assert list(sent["engine"]) == ["fingerprint", "num_blocks", "page_bytes", "block_size",
                                    "max_model_len", "max_num_batched_tokens"]


def test_a_repair_reply_carries_only_the_fields_of_its_result() -> None:
    intact = RepairResponse(cid="c", damaged_pages=0, result="intact", ms=1.5)
    assert list(intact.to_json()) == ["cid", "damaged_pages", "result", "ms"]
    restored = RepairResponse(cid="c", damaged_pages=2, result="restored", cleared_pages=2,
                              recomputed_sequences=1, ms=1.5)
    assert list(restored.to_json()) == ["cid", "damaged_pages", "result", "cleared_pages",
                                        "recomputed_sequences", "ms"]
    replaced = RepairResponse(cid="c", damaged_pages=2, result="replaced", cleared_pages=2,
                              recomputed_sequences=1, new_cid="d", moved_refs=["HEAD", "a"], ms=1.5)
    assert replaced.to_json()["moved_refs"] == ["HEAD", "a"]
    assert list(replaced.to_json())[-3:] == ["new_cid", "moved_refs", "ms"]


def test_a_reply_that_drifts_from_its_model_is_refused(history: History) -> None:
    with Store(history.path) as store:
        doc = documents.log_doc(store.log("HEAD"), head=documents.head_doc(store))
    with pytest.raises(ValidationError, match="extra"):
        LogResponse.model_validate({**doc, "extra": 1})
    with pytest.raises(ValidationError):
        LogResponse.model_validate({"head": doc["head"]})
    with pytest.raises(ValidationError):
        RepairResponse(cid="c", damaged_pages=0, result="fixed", ms=1.0)


def test_the_error_model_is_the_error_shape() -> None:
    body = ApiError(404, "not_found", "unknown revision 'x'").body()
    assert ErrorResponse.model_validate(body).to_json() == body


def test_the_openapi_document_names_every_routes_reply() -> None:
    from fastapi import FastAPI
    from processfork.plugin.routes import build_router

    app = FastAPI()
    app.include_router(build_router())
    paths = app.openapi()["paths"]
    replies = {
        ("post", "/snapshot"): "SnapshotResponse",
        ("post", "/fork"): "ForkResponse",
        ("post", "/checkout"): "CheckoutResponse",
        ("post", "/repair"): "RepairResponse",
        ("get", "/snapshots/{rev}"): "SnapshotSummary",
        ("get", "/log"): "LogResponse",
        ("get", "/refs"): "RefsResponse",
        ("delete", "/refs/{name}"): "DeleteRefResponse",
        ("post", "/reset"): "ResetResponse",
        ("post", "/push"): "PushResponse",
        ("post", "/fetch"): "FetchResponse",
        ("post", "/pull"): "PullResponse",
        ("get", "/status"): "StatusResponse",
    }
    documented = {
        (method, path.removeprefix("/v1/processfork")): op["responses"]
        for path, ops in paths.items() for method, op in ops.items()
    }
    assert set(documented) == set(replies)
    for route, model in replies.items():
        responses = documented[route]
        assert responses["200"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}, route
        assert responses["4XX"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}, route
