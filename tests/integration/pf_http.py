"""Small HTTP helpers shared by the integration tests (real server, real HTTP)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import httpx
from processfork.store import Store

from processfork_dev.store_damage import damage_object as damage_page  # noqa: F401 (re-exported)

PF = "/v1/processfork"


def headers(server: Any, api_key: str | None = ...) -> dict[str, str]:  # type: ignore[assignment]
    key = server.api_key if api_key is ... else api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


def post(server: Any, path: str, body: Any = None, *, raw: bytes | None = None,
         api_key: str | None = ...) -> httpx.Response:  # type: ignore[assignment]
    kwargs: dict[str, Any] = {"content": raw} if raw is not None else {"json": body}
    return httpx.post(f"{server.base_url}{path}", headers=headers(server, api_key), timeout=300,
                      trust_env=False, **kwargs)


def get(server: Any, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{server.base_url}{path}", headers=headers(server), params=params,
                     timeout=60, trust_env=False)


def pf(server: Any, op: str, body: Any) -> dict[str, Any]:
    """POST /v1/processfork/<op> and return the JSON body, failing loudly on an error status."""
    response = post(server, f"{PF}/{op}", body)
    assert response.status_code == 200, response.text
    return response.json()


def complete(server: Any, prompt: Any, *, max_tokens: int = 20, **extra: Any) -> dict[str, Any]:
    """A greedy completion through the ordinary OpenAI route (token ids or text)."""
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, **extra}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


def cached_tokens(completion: dict[str, Any]) -> int:
    """vLLM's own count of prompt tokens served from its prefix cache (not recomputed)."""
    details = completion["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def random_tokens(seed: int, n: int, vocab: int = 1024, low: int = 300) -> list[int]:
    """Token ids no other test sends, so a prompt starts with a cold prefix cache."""
    rng = random.Random(seed)
    return [rng.randrange(low, vocab) for _ in range(n)]


def warm_snapshots(server: Any, lengths: Any, *, seed: int, prefix: str, block: int,
                   ) -> tuple[dict[int, list[int]], dict[int, Any], dict[int, dict[str, Any]]]:
    """For each length: a random prompt (seeds from ``seed`` on), computed once, then its warm
    prefix hit (12 greedy tokens with logprobs, the reference a restore must equal) and a
    snapshot of it named ``prefix/length``."""
    prompts, warm, snapshots = {}, {}, {}
    for i, length in enumerate(lengths):
        prompt = prompts[length] = random_tokens(seed + i, length)
        complete(server, prompt, max_tokens=12, logprobs=5)
        warm[length] = complete(server, prompt, max_tokens=12, logprobs=5)
        assert cached_tokens(warm[length]) == (length - 1) // block * block
        snapshots[length] = pf(server, "snapshot",
                               {"name": f"{prefix}/{length}", "token_ids": prompt})
    return prompts, warm, snapshots


def extended_snapshot(server: Any, *, seed: int, name: str, length: int, extra: int,
                      block: int) -> tuple[list[int], dict[str, Any], list[int], Any]:
    """A snapshot ``name`` of a random prompt of ``length`` tokens, then the warm prefix hit of
    that prompt extended by ``extra`` tokens: the reference for a restore of a request that
    extends a snapshot. Returns the prompt, the snapshot, the extended prompt and its hit."""
    base = random_tokens(seed, length)
    snapshot = pf(server, "snapshot", {"name": name, "token_ids": base})
    extended = base + random_tokens(seed + 1, extra)
    warm = complete(server, extended, max_tokens=12, logprobs=5)
    assert cached_tokens(warm) == length // block * block
    return base, snapshot, extended, warm


def metric(server: Any, name: str) -> float:
    """Sum of a Prometheus counter over its label sets, from the server's /metrics."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=30, trust_env=False).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for_ref(store_path: Path | str, ref: str, old: str | None) -> str:
    """The ref's new value: a session turn commits after its response, on the engine's side."""
    deadline = time.monotonic() + 120
    while True:
        with Store(store_path, readonly=True) as store:
            now = store.get_ref(ref)
        if now is not None and now != old:
            return now
        assert time.monotonic() < deadline, f"{ref} did not move from {old}"
        time.sleep(0.2)
