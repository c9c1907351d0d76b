"""A small HTTP client for the server's `/v1/processfork/` routes (docs/http-api.md has the shapes).

Every failure becomes a `ServerError` (the server answered with an error status) or `ServerUnreachable`
(no answer), so commands never see httpx exceptions and `main()` can pick the exit code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, final
from urllib.parse import quote

import httpx
from processfork.store import documents

from processfork_cli.errors import ServerError, ServerUnreachable, UserError

__all__ = ["API_PREFIX", "Client"]

API_PREFIX = "/v1/processfork"

# Snapshots and checkouts of long contexts run a forward pass: reads may take minutes, connecting not.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


def server_base(url: str) -> str:
    """The server's base URL from what a user has at hand, or a UserError saying what to fix.

    `http://host:8000`, `http://host:8000/` and the OpenAI-style `http://host:8000/v1` (or
    `.../v1/processfork`) all mean the same server; a URL without a scheme is a mistake, not an
    unreachable server.
    """
    text = (url or "").strip().rstrip("/")
    if "://" not in text:
        raise UserError(f"server URL {url!r} has no scheme; use http://{text or 'HOST:PORT'}")
    scheme, rest = text.split("://", 1)
    if scheme.lower() not in ("http", "https") or not rest or rest.startswith("/"):
        raise UserError(f"server URL {url!r} is not an http:// or https:// URL with a host")
    for suffix in (API_PREFIX, "/v1"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    return text


@final
class Client:
    """Synchronous client; one instance per command, closed by `with`."""

    def __init__(
        self,
        server: str,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = server_base(server)
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.server + API_PREFIX,
            headers=headers,
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- routes ------------------------------------------------------------------------------------

    def snapshot(
        self,
        name: str,
        *,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        token_ids: Sequence[int] | None = None,
        request_id: str | None = None,
        parent: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """POST /snapshot; with no sequence source the server captures the whole resident state."""
        body: dict[str, Any] = {"name": name}
        for key, value in (
            ("prompt", prompt),
            ("messages", messages),
            ("token_ids", token_ids),
            ("request_id", request_id),
            ("parent", parent),
        ):
            if value is not None:
                body[key] = list(value) if key in ("messages", "token_ids") else value
        body.update({k: v for k, v in extra.items() if v is not None})
        return self.request("POST", "/snapshot", json=body)

    def fork(self, rev: str, n: int, *, name: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"cid": rev, "n": n}
        if name is not None:
            body["name"] = name
        return self._expect(self.request("POST", "/fork", json=body), documents.FORK_KEYS, "POST /fork")

    def checkout(self, rev: str) -> dict[str, Any]:
        return self.request("POST", "/checkout", json={"cid": rev})

    def repair(self, rev: str) -> dict[str, Any]:
        """POST /repair: recompute the snapshot's damaged pages on the engine."""
        return self.request("POST", "/repair", json={"cid": rev})

    def show(self, rev: str) -> dict[str, Any]:
        """The `pf show` document (processfork.store.documents.snapshot_doc) of one snapshot."""
        doc = self.request("GET", f"/snapshots/{quote(rev, safe='')}")
        return self._expect(doc, documents.SNAPSHOT_KEYS, "GET /snapshots/{rev}")

    def log(
        self, ref: str | None = None, *, limit: int | None = None, all_refs: bool = False
    ) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if ref is not None:
            params["ref"] = ref
        if limit is not None:
            params["limit"] = limit
        if all_refs:
            params["all"] = "true"
        return self._expect(self.request("GET", "/log", params=params), documents.LOG_KEYS, "GET /log")

    def refs(self) -> dict[str, Any]:
        doc = self._expect(self.request("GET", "/refs"), documents.REFS_KEYS, "GET /refs")
        if not isinstance(doc["refs"], list):
            raise self._unexpected("GET /refs", "refs is not a list")
        return doc

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/status")

    # -- plumbing ----------------------------------------------------------------------------------

    def _expect(self, doc: Any, keys: frozenset[str], route: str) -> dict[str, Any]:
        """The commands render server documents like local ones; a different shape is the server's
        fault (an older or newer plugin), reported as such instead of a KeyError later."""
        if not isinstance(doc, dict):
            raise self._unexpected(route, "not a JSON object")
        missing = sorted(keys - doc.keys())
        if missing:
            raise self._unexpected(route, "missing " + ", ".join(missing))
        return doc

    def _unexpected(self, route: str, detail: str) -> ServerError:
        return ServerError(
            200,
            "UnexpectedDocument",
            f"{route} answered a document pf cannot read ({detail})",
            self.server,
            hint="the server's processfork plugin and this pf come from different versions",
        )


    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        """Send one request and return its JSON body, or raise the project's error for it."""
        try:
            response = self._http.request(method, path, json=json, params=params)
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(self.server, f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.server, _reason(exc)) from exc
        if response.status_code >= 400:
            raise _error_from(response, self.server)
        try:
            return response.json()
        except ValueError as exc:
            raise ServerError(
                response.status_code,
                "InvalidResponse",
                f"{method} {path} did not answer JSON",
                self.server,
                hint="is --server pointing at a vLLM server with the processfork plugin?",
            ) from exc


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc).strip()
    if isinstance(exc, httpx.ConnectError) and ("refused" in text.lower() or not text):
        return "connection refused"
    return text or type(exc).__name__


def _error_from(response: httpx.Response, server: str) -> ServerError:
    """Read `{"error": {"type", "message"}}`, and the shapes FastAPI and vLLM use for their own errors."""
    status = response.status_code
    error_type = response.reason_phrase or "Error"
    message = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    ours = False
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            error_type = str(error.get("type") or error_type)
            message = str(error.get("message") or "")
            ours = True
        elif isinstance(error, str):
            message = error
        elif "detail" in body:
            message = _detail_text(body["detail"])
        elif "message" in body:
            message = str(body["message"])
    text = (response.text or "").strip()
    if not message and text and not text.startswith("<"):  # an HTML error page says nothing useful
        message = text.splitlines()[0][:200]
    message = " ".join((message or error_type).split())
    hint = None
    if status == 401:
        hint = "pass --api-key or set PF_API_KEY to the key the server was started with"
    elif status == 404 and not ours:
        hint = "is the processfork plugin enabled on this server? (`pf serve` enables it)"
    return ServerError(status, error_type, message, server, hint=hint)


def _detail_text(detail: Any) -> str:
    """FastAPI validation errors come as a list of {loc, msg}; keep them on one line."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)
