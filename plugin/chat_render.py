"""Token ids of a chat, rendered exactly as this server's ``/v1/chat/completions`` renders it.

A ``messages`` snapshot must hold the very tokens the next chat request will send, or that
request misses the restored pages. The server's own rendering depends on its ``--chat-template``,
``--chat-template-content-format``, the tools and the template's kwargs; rather than repeat that
logic (and drift from it across vLLM versions), the snapshot route asks vLLM's own render route,
``POST /v1/chat/completions/render``, in process, with the caller's credentials.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import Request

from .api_errors import ApiError
from .api_models import SnapshotBody

__all__ = ["CHAT_FIELDS", "RENDER_ROUTE", "render_chat"]

RENDER_ROUTE = "/v1/chat/completions/render"
#: Snapshot body fields that shape the rendering, passed to the render route as they are.
CHAT_FIELDS = ("messages", "tools", "add_generation_prompt", "continue_final_message",
               "chat_template_kwargs")


async def render_chat(request: Request, body: SnapshotBody) -> list[int] | None:
    """The chat's token ids, or None when this vLLM has no render route (the caller falls back)."""
    payload: dict[str, Any] = {
        name: getattr(body, name) for name in CHAT_FIELDS if getattr(body, name) is not None
    }
    headers = {"content-type": "application/json"}
    auth = request.headers.get("authorization")
    if auth:
        headers["authorization"] = auth
    transport = httpx.ASGITransport(app=request.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://render") as client:
        response = await client.post(RENDER_ROUTE, json=payload, headers=headers)
    if response.status_code in (404, 405, 501):
        return None
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.status_code != 200 or not isinstance(doc, dict):
        message = _error_text(doc) or response.text[:300]
        raise ApiError(400, "invalid_request", f"cannot render messages: {message}")
    ids = doc.get("token_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        return None
    return ids


def _error_text(doc: Any) -> str:
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or "")
        if "detail" in doc:
            return str(doc["detail"])
        if "message" in doc:
            return str(doc["message"])
    return ""
