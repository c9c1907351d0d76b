"""A `messages` snapshot holds exactly the tokens `/v1/chat/completions` renders on that server:
its `--chat-template`, tools, `add_generation_prompt` and `chat_template_kwargs` included."""

from __future__ import annotations

import pytest
from pf_http import cached_tokens, pf, post
from processfork.store import Store

pytestmark = pytest.mark.integration

MESSAGES = [
    {"role": "system", "content": "You keep answers short. " * 6},
    {"role": "user", "content": "Name three rivers of Europe, and why they matter. " * 3},
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up",
                                            "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def templated(other_server):
    """A server given a chat template that is not its model's (conftest's ``CHAT_TEMPLATE``):
    ``other_server``, whose other model the error tests need; its tokenizer is the same."""
    return other_server


def _chat_prompt_ids(server, **extra) -> tuple[list[int], dict]:
    body = {"model": server.model_name, "messages": MESSAGES, "max_tokens": 1, "temperature": 0,
            "return_token_ids": True, **extra}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    doc = response.json()
    return list(doc["prompt_token_ids"]), doc


def _stored_ids(server, snap) -> list[int]:
    with Store(server.store, readonly=True) as store:
        seq = store.get_snapshot(snap["cid"]).sequences[0]
        return list(store.get_tokens(seq.tokens))


@pytest.mark.parametrize("extra", [
    {},
    {"tools": TOOLS, "tool_choice": "none"},  # "auto" needs a tool parser on the server
    {"add_generation_prompt": False, "continue_final_message": False},
    {"chat_template_kwargs": {"unused_flag": True}},
])
def test_messages_snapshot_tokens_equal_the_chat_completions_prompt(templated, extra):
    name = "chat/" + ("-".join(sorted(extra)) or "plain")
    snap = pf(templated, "snapshot", {"name": name, "messages": MESSAGES, **extra})
    prompt_ids, doc = _chat_prompt_ids(templated, **extra)
    assert _stored_ids(templated, snap) == prompt_ids
    # The snapshot computed exactly these tokens: the chat request finds every block resident.
    assert cached_tokens(doc) == (len(prompt_ids) - 1) // 32 * 32


def test_the_server_template_is_the_one_used(server, templated):
    """Same messages, two servers: each snapshot matches its own server's chat rendering."""
    ours = pf(server, "snapshot", {"name": "chat/model-template", "messages": MESSAGES})
    theirs = pf(templated, "snapshot", {"name": "chat/server-template", "messages": MESSAGES})
    model_ids, _ = _chat_prompt_ids(server)
    server_ids, _ = _chat_prompt_ids(templated)
    assert model_ids != server_ids
    assert _stored_ids(server, ours) == model_ids
    assert _stored_ids(templated, theirs) == server_ids


def test_chat_fields_without_messages_are_refused(server):
    response = post(server, "/v1/processfork/snapshot", {"name": "x", "prompt": "a",
                                                         "tools": TOOLS})
    assert response.status_code == 422, response.text
    assert "messages" in response.json()["error"]["message"]
