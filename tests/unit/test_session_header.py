"""The X-Processfork-Session header becomes the body's session, before vLLM parses the request."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from processfork.plugin.session_header import SessionHeader


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    @app.post("/v1/other")
    async def echo(request: Request) -> dict:
        return {"raw": (await request.body()).decode()}

    app.add_middleware(SessionHeader)
    return TestClient(app)


def _sent(response) -> dict:
    assert response.status_code == 200, response.text
    return json.loads(response.json()["raw"])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_the_header_names_the_session_in_kv_transfer_params(client, path):
    body = {"model": "m", "prompt": "hi", "kv_transfer_params": {"other": 1}}
    sent = _sent(client.post(path, json=body, headers={"X-Processfork-Session": "agent-42"}))
    assert sent["kv_transfer_params"] == {"other": 1, "processfork": {"session": "agent-42"}}
    assert sent["prompt"] == "hi"


def test_without_the_header_the_body_passes_byte_for_byte(client):
    raw = b'{"model": "m",   "prompt": "hi"}'
    response = client.post("/v1/completions", content=raw)
    assert response.json()["raw"] == raw.decode()


def test_other_routes_ignore_the_header(client):
    raw = b'{"x": 1}'
    response = client.post("/v1/other", content=raw, headers={"X-Processfork-Session": "a"})
    assert response.json()["raw"] == raw.decode()


@pytest.mark.parametrize(("name", "body"), [
    ("a..b", {"prompt": "hi"}),
    ("bad name", {"prompt": "hi"}),
    ("a", {"prompt": "hi", "kv_transfer_params": {"processfork": {"session": "b"}}}),
    ("a", {"prompt": "hi", "kv_transfer_params": ["x"]}),
])
def test_bad_sessions_are_a_400_in_the_error_shape(client, name, body):
    response = client.post("/v1/completions", json=body, headers={"X-Processfork-Session": name})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["message"]


@pytest.mark.parametrize("session", ["a..b", "", 7, "bad name"])
def test_an_invalid_session_in_the_body_is_a_400_too(client, session):
    body = {"prompt": "hi", "kv_transfer_params": {"processfork": {"session": session}}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"


def test_a_valid_session_in_the_body_passes_unchanged(client):
    raw = b'{"prompt": "hi", "kv_transfer_params": {"processfork": {"session": "ok-1"}}}'
    assert client.post("/v1/completions", content=raw).json()["raw"] == raw.decode()
