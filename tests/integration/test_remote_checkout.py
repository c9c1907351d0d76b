"""A replica checks out a snapshot that another replica pushed to a remote.

The session server (replica A) snapshots a context and its store is pushed to a SeaweedFS
remote. Replica B starts on an empty store with that remote (`pf serve --remote`'s connector
config); its checkout of the ref fetches the snapshot (manifest, tokens, pages, each verified)
and loads it, and its continuation is bit-identical, tokens and logprobs, to A's warm
prefix-cache hit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from pf_http import cached_tokens, complete, pf, post, random_tokens
from processfork.plugin.launch_plan import kv_transfer_config
from processfork.store import Store
from processfork.store.remote import open_remote
from processfork.store.remote.push import push

from processfork_dev.s3_server import BUCKET, start_s3_server

pytestmark = pytest.mark.integration

BLOCK = 32
REF = "remote-it/base"


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


def test_replica_checks_out_what_another_pushed(
    server, pf_store, start_server, tmp_path_factory, remote_url
) -> None:
    tokens = random_tokens(9100, 12 * BLOCK + 7)
    complete(server, tokens, max_tokens=8, logprobs=5)  # cold: computes and caches
    warm = complete(server, tokens, max_tokens=8, logprobs=5)
    assert cached_tokens(warm) == 12 * BLOCK
    cid = pf(server, "snapshot", {"name": REF, "token_ids": tokens})["cid"]
    with Store(pf_store) as store:
        pushed = push(store.env, open_remote(remote_url, env=store.env), {REF: cid})
    assert pushed.pages == 2 * 13

    store_b = tmp_path_factory.mktemp("replica-b")
    config = kv_transfer_config(store_b, remote=remote_url)
    replica = start_server(store=store_b, extra_args=(
        "--max-model-len", "4096", "--max-num-batched-tokens", "256",
        "--kv-transfer-config", json.dumps(config)))
    try:
        missing = post(replica, "/v1/processfork/checkout", {"cid": "remote-it/nope"})
        assert missing.status_code == 404, missing.text
        out = pf(replica, "checkout", {"cid": REF})
        assert out["cid"] == cid and out["tokens_loaded"] == 12 * BLOCK
        with Store(store_b, readonly=True) as store:
            assert store.get_ref(REF) == cid and list(store.fsck()) == []
        restored = complete(replica, tokens, max_tokens=8, logprobs=5)
        assert cached_tokens(restored) == 12 * BLOCK
        got, want = restored["choices"][0]["logprobs"], warm["choices"][0]["logprobs"]
        assert got["tokens"] == want["tokens"]
        assert got["token_logprobs"] == want["token_logprobs"]
        assert got["top_logprobs"] == want["top_logprobs"]
    finally:
        replica.stop()
