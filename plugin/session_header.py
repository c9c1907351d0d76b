"""The ``X-Processfork-Session`` header on vLLM's completion routes.  Runs in the API server.

A client that cannot set ``kv_transfer_params`` (a proxy, a client library without extra body
fields) names its session in a header instead. This ASGI middleware turns the header into the
request body's ``kv_transfer_params: {"processfork": {"session": NAME}}``, which is what the
scheduler side reads (``sessions.py``). A body without the header passes byte for byte (it is
parsed only when it mentions ``processfork``). A session name that makes no valid ref, from the
header or the body, or a header that contradicts the body's own session, is refused with
``400 invalid_request`` before the engine sees the request.
"""

from __future__ import annotations

import json
from typing import Any

from .api_errors import ApiError
from .jobs import PARAMS_KEY
from .sessions import DEFAULT_PREFIX, session_ref

__all__ = ["HEADER", "SESSION_PATHS", "SessionHeader"]

HEADER = b"x-processfork-session"
SESSION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class SessionHeader:
    """ASGI middleware: the session header becomes the body's session."""

    def __init__(self, app: Any, prefix: str = DEFAULT_PREFIX) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or (
            scope.get("path") not in SESSION_PATHS
        ):
            await self.app(scope, receive, send)
            return
        name = None
        for key, value in scope.get("headers", []):
            if key.lower() == HEADER:
                name = value.decode("utf-8", "replace")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            if name is not None:
                new_body = self._rewrite(body, name)
            else:
                self._check(body)
                new_body = body
        except ApiError as exc:
            await _send_error(send, exc)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(new_body)).encode()))
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": new_body, "more_body": False}
            return await receive()  # the disconnect, when it comes

        await self.app({**scope, "headers": headers}, replay, send)

    def _check(self, body: bytes) -> None:
        """A session named in the body must make a valid ref (bodies that do not mention the
        plugin are not parsed)."""
        if PARAMS_KEY.encode() not in body:
            return
        try:
            doc = json.loads(body)
        except ValueError:
            return
        params = doc.get("kv_transfer_params") if isinstance(doc, dict) else None
        ours = params.get(PARAMS_KEY) if isinstance(params, dict) else None
        if isinstance(ours, dict) and "session" in ours and "op" not in ours:
            ref, why = session_ref(params, self.prefix)
            if ref is None:
                raise ApiError(400, "invalid_request",
                               f"invalid session name {ours['session']!r}: {why}")

    def _rewrite(self, body: bytes, name: str) -> bytes:
        try:
            doc = json.loads(body)
        except ValueError:
            return body  # not JSON: vLLM answers it as it would without the header
        if not isinstance(doc, dict):
            return body
        params = doc.get("kv_transfer_params")
        if params is None:
            params = doc["kv_transfer_params"] = {}
        if not isinstance(params, dict):
            raise ApiError(400, "invalid_request", "kv_transfer_params must be an object")
        ours = params.get(PARAMS_KEY)
        if ours is None:
            ours = params[PARAMS_KEY] = {}
        if not isinstance(ours, dict):
            raise ApiError(400, "invalid_request",
                           f"kv_transfer_params.{PARAMS_KEY} must be an object")
        if "session" in ours and ours["session"] != name:
            raise ApiError(400, "invalid_request",
                           f"the X-Processfork-Session header names session {name!r} but "
                           f"kv_transfer_params names {ours['session']!r}")
        ref, why = session_ref({PARAMS_KEY: {"session": name}}, self.prefix)
        if ref is None:
            raise ApiError(400, "invalid_request", f"invalid session name {name!r}: {why}")
        ours["session"] = name
        return json.dumps(doc).encode()


async def _send_error(send: Any, exc: ApiError) -> None:
    payload = json.dumps(exc.body()).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
