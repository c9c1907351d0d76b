"""Token ids of a chat, rendered exactly as this server's ``/v1/chat/completions`` renders it.

A ``messages`` snapshot must hold the very tokens the next chat request will send, or that
request misses the restored pages. The server's rendering depends on its ``--chat-template``,
``--chat-template-content-format``, the request's tools and the template's kwargs; rather than
repeat that logic (and drift from it across vLLM versions), the snapshot route hands a chat
completion request to the server's own chat handler, ``OpenAIServingChat.render_chat_request``
(vLLM 0.26 to 0.33), which is the step ``/v1/chat/completions`` itself starts with.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from .api_errors import ApiError
from .api_models import SnapshotBody

__all__ = ["CHAT_FIELDS", "render_chat"]

#: Snapshot body fields that shape the rendering, passed on as a chat completion request has them.
CHAT_FIELDS = ("messages", "tools", "tool_choice", "add_generation_prompt",
               "continue_final_message", "chat_template_kwargs")


async def render_chat(request: Request, body: SnapshotBody) -> list[int] | None:
    """The chat's token ids; None when this server has no chat handler to ask (the caller then
    falls back to the model's own template)."""
    serving = getattr(request.app.state, "openai_serving_chat", None)
    render = getattr(serving, "render_chat_request", None)
    if render is None:
        return None
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    except ImportError:
        return None
    fields: dict[str, Any] = {
        name: getattr(body, name) for name in CHAT_FIELDS if getattr(body, name) is not None
    }
    try:
        chat = ChatCompletionRequest(max_tokens=1, **fields)
    except ValueError as exc:  # pydantic's ValidationError: the client's messages or tools
        raise ApiError(400, "invalid_request", f"invalid chat request: {_first_line(exc)}") from exc
    try:
        result = await render(chat)
    except ValueError as exc:  # a template that fails on these messages
        raise ApiError(400, "invalid_request", f"cannot render messages: {exc}") from exc
    error = getattr(result, "error", None)
    if error is not None:
        raise ApiError(400, "invalid_request",
                       f"cannot render messages: {getattr(error, 'message', error)}")
    try:
        _, engine_inputs = result
        ids = engine_inputs[0].get("prompt_token_ids")
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        return None
    return list(ids)


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
