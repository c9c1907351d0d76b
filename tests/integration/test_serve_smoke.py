"""The session server starts with the plugin wired in and answers ordinary OpenAI requests."""

from __future__ import annotations

import httpx
import psutil
import pytest
from processfork.plugin.launch_plan import DEFAULT_BLOCK_SIZE, pinned_cpus

pytestmark = pytest.mark.integration

PROMPT = (
    "The river ran slowly past the old mill, and the children who lived in the village spent "
    "their summer afternoons on its banks, building small boats out of bark and leaves."
)


def _get(server, path: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    return httpx.get(f"{server.base_url}{path}", headers=headers, timeout=30, trust_env=False)


def _greedy(openai_client, server, prompt: str = PROMPT, max_tokens: int = 8):
    return openai_client.completions.create(
        model=server.model_name, prompt=prompt, max_tokens=max_tokens, temperature=0,
        logprobs=1,
    )


def test_health(server):
    assert _get(server, "/health").status_code == 200


def test_models_lists_the_served_model(openai_client, server):
    ids = [model.id for model in openai_client.models.list().data]
    assert ids == [server.model_name]


def test_completion(openai_client, server):
    response = _greedy(openai_client, server)
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 8
    assert response.usage.prompt_tokens > 20  # byte-level BPE: English text is many tokens
    assert len(choice.logprobs.token_logprobs) == 8


def test_chat_completion_uses_the_chat_template(openai_client, server):
    response = openai_client.chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=4, temperature=0,
    )
    assert response.choices[0].message.role == "assistant"
    assert response.usage.completion_tokens == 4


def test_plugin_is_wired_to_the_store(server, pf_store):
    """VLLM_PLUGINS loads our routes, and the connector got the store and the CPU defaults."""
    response = _get(server, "/v1/processfork/status")
    assert response.status_code == 200, response.text
    status = response.json()
    assert status["store"]["path"] == str(pf_store)
    fingerprint = status["engine"]["fingerprint"]
    assert fingerprint["block_size"] == DEFAULT_BLOCK_SIZE
    assert fingerprint["kv_dtype"] == "float32"
    assert fingerprint["threads"] == len(pinned_cpus(None))


def test_repeated_prompt_hits_the_prefix_cache(openai_client, server):
    first = _greedy(openai_client, server, prompt="Cache me: " + PROMPT)
    second = _greedy(openai_client, server, prompt="Cache me: " + PROMPT)
    prompt_tokens = second.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == \
        (prompt_tokens - 1) // DEFAULT_BLOCK_SIZE * DEFAULT_BLOCK_SIZE
    assert second.choices[0].text == first.choices[0].text


RESTART_PROMPT = "Restart: " + PROMPT


def prepare_before_restart(server, pf_store, openai_client):
    """The session server's shared restart (conftest's ``restarted``) comes after this."""
    return _greedy(openai_client, server, prompt=RESTART_PROMPT)


def test_restart_comes_back_cold_with_the_same_results(openai_client, server, restarted):
    """Pinned threads make a restarted engine compute the same bits; its cache starts empty."""
    before = restarted.prepared[__name__]
    assert not [pid for pid in restarted.old_pids if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    after = _greedy(openai_client, server, prompt=RESTART_PROMPT)
    assert after.usage.prompt_tokens_details.cached_tokens == 0
    assert after.choices[0].text == before.choices[0].text
    assert after.choices[0].logprobs.token_logprobs == before.choices[0].logprobs.token_logprobs
