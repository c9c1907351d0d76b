"""A replica restores snapshots that another replica pushed to a remote.

The session server (replica A) snapshots two contexts and pushes them to a SeaweedFS remote.
Replica B starts on an empty store with that remote (`pf serve --remote`'s connector config).
Its checkout of one ref fetches that snapshot (manifest, tokens, pages, each verified) and loads
it; a plain completion of the other context, with no checkout at all, finds it in the remote's
prefix records, fetches it and loads it (a transparent restore through the remote). Both
continuations are bit-identical, tokens and logprobs, to A's warm prefix-cache hits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pf_http import cached_tokens, complete, metric, pf, post, random_tokens
from processfork.plugin.launch_plan import kv_transfer_config
from processfork.store import Store
from processfork.store.remote import open_remote
from processfork.store.remote.push import push

from processfork_dev.s3_server import BUCKET, start_s3_server

pytestmark = pytest.mark.integration

BLOCK = 32
REF = "remote-it/base"
LAZY_REF = "remote-it/lazy"


@dataclass
class Pushed:
    tokens: list[int]
    warm: dict[str, Any]  # A's warm prefix-cache hit
    cid: str


@pytest.fixture(scope="module")
def remote_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server.env().items():
            mp.setenv(key, value)  # the replica started below inherits them
        try:
            yield f"s3://{BUCKET}/replicas"
        finally:
            server.stop()


@pytest.fixture(scope="module")
def pushed(server, pf_store, remote_url) -> dict[str, Pushed]:
    """Replica A computes, snapshots and pushes two unrelated contexts."""
    out = {}
    for ref, seed, blocks in ((REF, 9100, 12), (LAZY_REF, 9200, 10)):
        tokens = random_tokens(seed, blocks * BLOCK + 7)
        complete(server, tokens, max_tokens=8, logprobs=5)  # cold: computes and caches
        warm = complete(server, tokens, max_tokens=8, logprobs=5)
        assert cached_tokens(warm) == blocks * BLOCK
        cid = pf(server, "snapshot", {"name": ref, "token_ids": tokens})["cid"]
        out[ref] = Pushed(tokens, warm, cid)
    with Store(pf_store) as store:
        result = push(store.env, open_remote(remote_url, env=store.env),
                      {ref: p.cid for ref, p in out.items()})
    assert result.pages == 2 * (13 + 11) and result.prefix_records == 2
    return out


@pytest.fixture(scope="module")
def replica(pushed, start_server, tmp_path_factory, remote_url):
    store_b = tmp_path_factory.mktemp("replica-b")
    config = kv_transfer_config(store_b, remote=remote_url)
    server = start_server(store=store_b, extra_args=(
        "--max-model-len", "4096", "--max-num-batched-tokens", "256",
        "--kv-transfer-config", json.dumps(config)))
    try:
        yield server
    finally:
        server.stop()


def _same_continuation(got: dict[str, Any], want: dict[str, Any]) -> None:
    got, want = got["choices"][0]["logprobs"], want["choices"][0]["logprobs"]
    assert got["tokens"] == want["tokens"]
    assert got["token_logprobs"] == want["token_logprobs"]
    assert got["top_logprobs"] == want["top_logprobs"]


def test_replica_checks_out_what_another_pushed(replica, pushed) -> None:
    base = pushed[REF]
    missing = post(replica, "/v1/processfork/checkout", {"cid": "remote-it/nope"})
    assert missing.status_code == 404, missing.text
    out = pf(replica, "checkout", {"cid": REF})
    assert out["cid"] == base.cid and out["tokens_loaded"] == 12 * BLOCK
    with Store(replica.store, readonly=True) as store:
        assert store.get_ref(REF) == base.cid and list(store.fsck()) == []
    restored = complete(replica, base.tokens, max_tokens=8, logprobs=5)
    assert cached_tokens(restored) == 12 * BLOCK
    _same_continuation(restored, base.warm)


def test_replica_restores_from_the_remote_without_a_checkout(replica, pushed) -> None:
    lazy = pushed[LAZY_REF]
    with Store(replica.store, readonly=True) as store:
        assert not store.has_snapshot(lazy.cid)  # nothing local: the remote has it
    # A prompt that matches nothing on the remote computes, and fetches nothing.
    complete(replica, random_tokens(9300, 6 * BLOCK + 1), max_tokens=2)
    assert metric(replica, "processfork_remote_waits_total") == 0

    restored = complete(replica, lazy.tokens, max_tokens=8, logprobs=5)
    params = restored.get("kv_transfer_params") or {}
    assert params.get("processfork", {}).get("loaded_tokens") == 10 * BLOCK, params
    assert cached_tokens(restored) == 10 * BLOCK
    _same_continuation(restored, lazy.warm)
    assert metric(replica, "processfork_remote_waits_total") == 1
    assert metric(replica, "processfork_remote_fetches_total") == 1
    assert metric(replica, "processfork_restored_tokens_total") >= 10 * BLOCK
    with Store(replica.store, readonly=True) as store:
        assert store.has_snapshot(lazy.cid) and list(store.fsck()) == []


def test_push_fetch_and_pull_over_http(replica, server, pushed, remote_url) -> None:
    """The server does the work of `pf pull` and `pf push` on its own store and remote."""
    pulled = post(replica, "/v1/processfork/pull", {})
    assert pulled.status_code == 200, pulled.text
    doc = pulled.json()
    assert doc["fetch"]["refs"] == {REF: pushed[REF].cid, LAZY_REF: pushed[LAZY_REF].cid}
    assert doc["fetch"]["snapshots"] == 0  # both came in already (checkout, restore)
    assert {m["ref"]: m["status"] for m in doc["refs"]} == {REF: "up-to-date",
                                                            LAZY_REF: "created"}

    tokens = random_tokens(9400, 3 * BLOCK + 5)
    cid = pf(replica, "snapshot", {"name": "remote-it/from-b", "token_ids": tokens})["cid"]
    pushed_b = post(replica, "/v1/processfork/push", {"refs": ["remote-it/from-b"]})
    assert pushed_b.status_code == 200, pushed_b.text
    result = pushed_b.json()
    assert [(u["ref"], u["new"], u["status"]) for u in result["refs"]] == [
        ("remote-it/from-b", cid, "created")]
    assert result["pages"] == 2 * 4 and result["prefix_records"] == 1
    remote = open_remote(remote_url)
    assert remote.read_ref("remote-it/from-b").cid == cid
    fetched = post(replica, "/v1/processfork/fetch", {"refs": ["remote-it/from-b"]}).json()
    assert fetched["refs"] == {"remote-it/from-b": cid} and fetched["pages"] == 0

    for body, status, kind in (
        ({"remote": remote_url}, 400, "invalid_request"),  # never a URL from a client
        ({"remote": "nope"}, 404, "not_found"),
        ({"refs": ["remote-it/none"]}, 400, "invalid_request"),
        ({"ref": REF}, 400, "invalid_request"),
    ):
        answer = post(replica, "/v1/processfork/push", body)
        assert (answer.status_code, answer.json()["error"]["type"]) == (status, kind), answer.text
    no_remote = post(server, "/v1/processfork/fetch", {})
    assert no_remote.status_code == 409 and no_remote.json()["error"]["type"] == "no_remote"
