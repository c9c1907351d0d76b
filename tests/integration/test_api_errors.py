"""Bad input gets a clear 4xx JSON error and loses nothing; never a 5xx for client input."""

from __future__ import annotations

import pytest
from pf_http import PF, pf, post, random_tokens

pytestmark = pytest.mark.integration


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) >= {"type", "message"}
    assert body["error"]["message"]
    assert "\n" not in body["error"]["message"]  # one line
    return body["error"]


@pytest.fixture(scope="module")
def known(server):
    """A snapshot of the session model, to check out on an incompatible server."""
    return pf(server, "snapshot", {"name": "errors/base", "token_ids": random_tokens(5000, 100)})


@pytest.fixture(scope="module")
def other(other_server):
    """A server with another model (3 layers) on the same store, guarded by an API key
    (conftest's ``other_server``, which the chat-template tests share)."""
    return other_server


def test_unknown_cid_is_404(server):
    _error(post(server, f"{PF}/checkout", {"cid": "0123456789abcdef"}), 404)
    _error(post(server, f"{PF}/checkout", {"cid": "no-such-ref"}), 404)
    _error(post(server, f"{PF}/fork", {"cid": "no-such-ref", "n": 2}), 404)
    _error(post(server, f"{PF}/snapshot", {"name": "x", "token_ids": [5, 6],
                                           "parent": "no-such-ref"}), 404)
    from pf_http import get

    _error(get(server, f"{PF}/snapshots/no-such-ref"), 404)


def test_too_short_prefix_is_unknown(server):
    _error(post(server, f"{PF}/checkout", {"cid": "abc"}), 404)


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("snapshot", b"{not json", 400),
        ("snapshot", b"[1, 2]", 400),
        ("snapshot", {}, 422),
        ("snapshot", {"name": ""}, 422),
        ("snapshot", {"name": "x", "prompt": "a", "token_ids": [1]}, 422),
        ("snapshot", {"name": "x", "token_ids": []}, 422),
        ("snapshot", {"name": "x", "token_ids": [-1, 3]}, 422),
        ("snapshot", {"name": "x", "token_ids": "12"}, 422),
        ("snapshot", {"name": "bad..name", "token_ids": [1, 2]}, 400),
        ("snapshot", {"name": "x", "token_ids": [10**9]}, 400),
        ("snapshot", {"name": "x", "messages": [{"role": 3}]}, 422),
        ("fork", {"cid": "errors/base", "n": 0}, 422),
        ("fork", {"cid": "errors/base"}, 422),
        ("fork", {"cid": "errors/base", "n": 2, "name": "bad name"}, 400),
        ("checkout", {}, 422),
        ("checkout", {"cid": 5}, 422),
        # Types are strict: a boolean or a float is not a count, null is not "absent".
        ("fork", {"cid": "errors/base", "n": True}, 422),
        ("fork", {"cid": "errors/base", "n": 2.0}, 422),
        ("snapshot", {"name": "x", "token_ids": None}, 422),
        ("snapshot", {"name": "x", "prompt": None}, 422),
        ("snapshot", {"name": "x", "token_ids": [5, 6.0]}, 422),
        # JSON that Python's parser takes but JSON does not, or that breaks it.
        ("snapshot", b'{"name": "x", "token_ids": [NaN]}', 400),
        ("fork", b'{"cid": "errors/base", "n": Infinity}', 400),
        ("snapshot", b'{"name": "x", "m": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
        ("snapshot", b'{"name": "ok1", "request_id": "\\ud800"}', 400),
    ],
)
def test_malformed_bodies_are_4xx(server, known, path, body, status):
    if isinstance(body, bytes):
        response = post(server, f"{PF}/{path}", raw=body)
    else:
        response = post(server, f"{PF}/{path}", body)
    _error(response, status)


@pytest.mark.parametrize(
    "path,body,field,suggestion",
    [
        ("snapshot", {"name": "typo", "promt": "hello"}, "promt", "prompt"),
        ("snapshot", {"name": "typo", "token_id": [5, 6]}, "token_id", "token_ids"),
        ("fork", {"cid": "errors/base", "n": 2, "nmae": "zz"}, "nmae", "name"),
        ("checkout", {"cid": "errors/base", "cdi": "x"}, "cdi", "cid"),
    ],
)
def test_unknown_fields_are_refused_with_the_closest_known_one(server, known, pf_store, path,
                                                               body, field, suggestion):
    from processfork.store import Store

    with Store(pf_store, readonly=True) as store:
        head_before = store.head()
    error = _error(post(server, f"{PF}/{path}", body), 400)
    assert error["type"] == "invalid_request"
    assert f"unknown field '{field}'" in error["message"]
    assert f"did you mean '{suggestion}'" in error["message"]
    with Store(pf_store, readonly=True) as store:
        assert store.head() == head_before  # nothing was snapshotted, forked or checked out
        assert store.get_ref("typo") is None


def test_sequence_longer_than_max_model_len_is_413(server):
    _error(post(server, f"{PF}/snapshot", {"name": "too-long",
                                           "token_ids": random_tokens(5001, 4096)}), 413)


def test_snapshot_of_unknown_request_is_404(server):
    _error(post(server, f"{PF}/snapshot", {"name": "x", "request_id": "cmpl-does-not-exist"}), 404)


def test_errors_lose_nothing(server, known):
    """After all the bad requests above, the earlier snapshot is intact and loadable."""
    checkout = pf(server, "checkout", {"cid": known["cid"]})
    assert checkout["cid"] == known["cid"]


def test_incompatible_fingerprint_is_409_naming_the_field(other, known):
    error = _error(post(other, f"{PF}/checkout", {"cid": known["cid"]}), 409)
    assert error["type"] == "incompatible_snapshot"
    assert "model_config_hash" in error["message"] or "num_layers" in error["message"]


def test_api_key_is_required(other, known):
    for key in (None, "wrong"):
        response = post(other, f"{PF}/checkout", {"cid": known["cid"]}, api_key=key)
        assert response.status_code == 401, response.text
        assert "error" in response.json()
    assert post(other, f"{PF}/fork", {"cid": known["cid"], "n": 1, "name": "keyed"}).status_code == 200


def test_clients_cannot_smuggle_connector_ops(server, known, pf_store):
    """kv_transfer_params from an OpenAI client never reach our connector as instructions."""
    from pf_http import cached_tokens, complete, metric
    from processfork.store import Store

    with Store(pf_store, readonly=True) as store:
        pins_before = len(store.list_pins())
    loads_before = metric(server, "vllm:external_prefix_cache_hits_total")
    prompt = random_tokens(5100, 100)
    smuggled = {"processfork": {"op": "checkout", "cid": known["cid"], "seq": 0, "job": "x"}}
    result = complete(server, prompt, max_tokens=2, kv_transfer_params=smuggled)
    assert cached_tokens(result) == 0
    assert metric(server, "vllm:external_prefix_cache_hits_total") == loads_before
    snap = {"processfork": {"op": "snapshot", "job": "y", "skip_blocks": 0}}
    complete(server, random_tokens(5101, 100), max_tokens=2, kv_transfer_params=snap)
    with Store(pf_store, readonly=True) as store:
        assert len(store.list_pins()) == pins_before


def test_checkout_by_ref_attaches_head_and_delete_refuses_it(server):
    from pf_http import get

    pf(server, "snapshot", {"name": "errors/head", "token_ids": random_tokens(5200, 40)})
    pf(server, "checkout", {"cid": "errors/head"})
    assert get(server, f"{PF}/refs").json()["head"]["ref"] == "errors/head"
    deleted = httpx_delete(server, f"{PF}/refs/errors/head")
    assert _error(deleted, 409)["type"] == "ref_is_head"
    assert httpx_delete(server, f"{PF}/refs/errors/head?force=true").status_code == 200
    _error(httpx_delete(server, f"{PF}/refs/errors/head"), 404)


def httpx_delete(server, path: str):
    import httpx
    from pf_http import headers

    return httpx.delete(f"{server.base_url}{path}", headers=headers(server), timeout=60,
                        trust_env=False)


@pytest.mark.parametrize("name", ["", "%0A", "a%00b"])
def test_deleting_a_ref_with_an_invalid_name_is_400(server, name):
    import httpx

    response = httpx.delete(f"{server.base_url}{PF}/refs/{name}", timeout=60, trust_env=False)
    _error(response, 400)


# -- hostile input: sizes, query parameters, routes (tests/integration/test_api_fuzz.py generates
# thousands more) ---------------------------------------------------------------------------------

MB = 1 << 20
#: Every route of the plugin, with a path that reaches its handler.
ROUTES = [("POST", "snapshot"), ("POST", "fork"), ("POST", "checkout"), ("POST", "repair"),
          ("GET", "snapshots/HEAD"), ("GET", "log"), ("GET", "refs"), ("GET", "status"),
          ("DELETE", "refs/no-such-ref")]


def _request(server, method: str, path: str, **kwargs):
    import httpx
    from pf_http import headers

    return httpx.request(method, f"{server.base_url}{PF}/{path}", headers=headers(server),
                         timeout=120, trust_env=False, **kwargs)


def _huge_prompt() -> bytes:
    return b'{"name": "huge", "prompt": "' + b"x" * (5 * MB) + b'"}'


@pytest.fixture
def client(server):
    """One client: the request after a refused body goes over the same kept-alive connection."""
    import httpx
    from pf_http import headers

    with httpx.Client(base_url=f"{server.base_url}{PF}/", headers=headers(server), timeout=120,
                      trust_env=False) as http:
        yield http


@pytest.mark.parametrize("method,path", ROUTES)
def test_body_over_the_limit_is_413_by_its_length(client, pf_store, method, path):
    """A 5 MB body is refused from its Content-Length, before it is read or parsed."""
    from processfork.store import Store

    with Store(pf_store, readonly=True) as store:
        refs_before = store.list_refs()
    error = _error(client.request(method, path, content=_huge_prompt()), 413)
    assert error["type"] == "body_too_large"
    assert "5,242,9" in error["message"] and "limit of 1,048,576 bytes" in error["message"]
    assert client.get("refs").status_code == 200  # the server answers the next request
    with Store(pf_store, readonly=True) as store:
        assert store.list_refs() == refs_before


@pytest.mark.parametrize("method,path", ROUTES)
def test_chunked_body_over_the_limit_is_413(client, method, path):
    """Without a Content-Length, reading stops once the bytes read pass the limit."""

    def chunks():
        yield b'{"name": "huge", "prompt": "'
        for _ in range(80):
            yield b"x" * 65536
        yield b'"}'

    error = _error(client.request(method, path, content=chunks()), 413)
    assert error["type"] == "body_too_large"
    assert "more than 1,048,576 bytes" in error["message"]
    assert client.get("refs").status_code == 200


def test_body_under_the_limit_is_read(server):
    body = b'{"name": "x", "prompt": "' + b" " * (MB - 100) + b'", "promt": 1}'
    error = _error(post(server, f"{PF}/snapshot", raw=body), 400)
    assert "unknown field 'promt'" in error["message"]  # parsed, not refused for its size


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "checkout", {"cid": "~" * 20000 + "x"}),
        ("POST", "fork", {"cid": "HEAD" + "~" * 2000, "n": 1}),
        ("POST", "repair", {"cid": "a" * 1025}),
        ("POST", "snapshot", {"name": "x", "token_ids": [5], "parent": "~" * 5000}),
        ("GET", "snapshots/" + "~" * 20000 + "x", None),
        ("GET", "log?ref=" + "~" * 20000 + "x", None),
    ],
)
def test_revision_longer_than_any_name_is_422(server, method, path, body):
    """Ref names stop at 255 bytes: a longer revision is refused before it is parsed (parsing
    `~` suffixes takes time in proportion to the square of their length)."""
    kwargs = {} if body is None else {"json": body}
    error = _error(_request(server, method, path, **kwargs), 422)
    assert "at most 1024 characters" in error["message"]


@pytest.mark.parametrize(
    "method,path,field",
    [
        ("GET", "log?limit=abc", "limit"),
        ("GET", "log?limit=0", "limit"),
        ("GET", "log?limit=-3", "limit"),
        ("GET", "log?limit=", "limit"),
        ("GET", "log?limit=1.5", "limit"),
        ("GET", "log?all=maybe", "all"),
        ("DELETE", "refs/no-such-ref?force=maybe", "force"),
    ],
)
def test_bad_query_parameters_are_422_naming_them(server, method, path, field):
    error = _error(_request(server, method, path), 422)
    assert error["type"] == "invalid_request"
    assert error["message"].startswith(f"{field}: ")


def test_huge_limit_is_all_entries(server, known):
    from pf_http import get

    response = get(server, f"{PF}/log", ref=known["cid"], limit="9" * 5000)
    assert response.status_code == 200, response.text
    assert response.json()["entries"][0]["cid"] == known["cid"]


@pytest.mark.parametrize(
    "method,path,status,type_",
    [
        ("GET", "snapshot", 405, "method_not_allowed"),
        ("PUT", "refs", 405, "method_not_allowed"),
        ("POST", "refs/x", 405, "method_not_allowed"),
        ("PATCH", "snapshots/HEAD", 405, "method_not_allowed"),
        ("TRACE", "status", 405, "method_not_allowed"),
        ("GET", "nope", 404, "not_found"),
        ("GET", "", 404, "not_found"),
    ],
)
def test_other_methods_and_paths_get_the_error_shape(server, method, path, status, type_):
    assert _error(_request(server, method, path), status)["type"] == type_


@pytest.mark.parametrize(
    "method,path,status",
    [("GET", "snapshots/a%0Ab", 404), ("DELETE", "refs/a%0Ab", 400), ("DELETE", "refs/a%0A", 400)],
)
def test_newlines_in_path_parameters_reach_the_route(server, method, path, status):
    error = _error(_request(server, method, path), status)
    assert "a\\nb" in error["message"] or "a\\n" in error["message"]


def test_long_input_is_quoted_in_a_short_message(server, known):
    error = _error(post(server, f"{PF}/fork", {"cid": known["cid"], "n": 1,
                                               "name": "n" * 10240}), 400)
    assert len(error["message"]) <= 1000
    assert error["message"].endswith("characters)")
