"""`pf fsck` names who uses a damaged page, and `pf repair` recomputes it on the real server.

A page damaged on disk is shared by a snapshot and its fork's children. fsck must name all of them
and their refs; repair must put the page back with the same bits (the engine still holds the
blocks, computed the same way), so every one of them is intact again under its old cid. A snapshot
whose pages the engine computes differently (here: pages that were never the model's KV) gets a
repaired copy that takes its refs.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from conftest import model_server
from pf_http import PF, complete, pf, post, random_tokens
from processfork.store import Manifest, SnapshotSequence, Store

from processfork_cli.main import run
from processfork_dev.store_damage import damage_object

pytestmark = pytest.mark.integration


def launch_ahead(servers):
    """A server with a store of its own: these tests damage pages and run a store-wide repair,
    which must neither see nor touch what other modules left in the session store."""
    return servers.launch(extra_args=("--max-model-len", "4096", "--max-num-batched-tokens", "256",
                                      "--enforce-eager"))  # compared only with itself


@pytest.fixture(scope="module")
def server(servers):
    yield from model_server(servers, __name__, launch_ahead)


def pf_cli(server: Any, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(["--server", server.base_url, "--store", str(server.store), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_fsck_names_the_users_and_repair_restores_the_page_in_place(server, capsys) -> None:
    import json

    tokens = random_tokens(71, 300)
    snap = pf(server, "snapshot", {"name": "repair/base", "token_ids": tokens})
    children = pf(server, "fork", {"cid": "repair/base", "n": 3})
    warm = complete(server, tokens, max_tokens=8, logprobs=1)
    with Store(server.store) as st:
        digest = st.get_snapshot(snap["cid"]).sequences[0].pages[4][0]
    damage_object(server.store, digest)

    code, out, _ = pf_cli(server, "fsck", "--json", capsys=capsys)
    assert code == 3
    [issue] = [i for i in json.loads(out)["issues"] if i["object"] == digest]
    assert issue["kind"] == "corrupt-page"
    assert set(issue["snapshots"]) == {snap["cid"], *children["cids"]}
    assert {"repair/base", *children["names"]} <= set(issue["refs"])

    code, out, _ = pf_cli(server, "repair", "--json", capsys=capsys)
    assert code == 0, out
    doc = json.loads(out)
    results = {r["cid"]: r for r in doc["repaired"]}
    assert set(doc["damaged"]) >= {snap["cid"], *children["cids"]}
    assert results[doc["damaged"][0]]["result"] == "restored"
    assert {r["result"] for r in doc["repaired"]} == {"restored", "intact"}
    assert doc["unrepairable"] == []

    code, out, _ = pf_cli(server, "fsck", capsys=capsys)
    assert code == 0, out
    with Store(server.store) as st:
        assert st.get_ref("repair/base") == snap["cid"]  # the same snapshot, intact again
        assert st.find_damage(snap["cid"]).intact
    # The engine still serves the prefix exactly as before.
    again = complete(server, tokens, max_tokens=8, logprobs=1)
    assert again["choices"][0]["text"] == warm["choices"][0]["text"]
    assert again["choices"][0]["logprobs"] == warm["choices"][0]["logprobs"]


def test_pages_the_engine_computes_differently_get_a_repaired_copy(server, capsys) -> None:
    import json

    tokens = random_tokens(72, 200)
    real = pf(server, "snapshot", {"name": "repair/real", "token_ids": tokens})
    with Store(server.store) as st:
        model = st.get_snapshot(real["cid"])
        size = len(st.get_page(bytes.fromhex(model.sequences[0].pages[0][0])))
        pairs = []
        for _ in model.sequences[0].pages:
            k, v = st.put_pages([os.urandom(size), os.urandom(size)]).digests
            pairs.append((k.hex(), v.hex()))
        fake = Manifest(name="repair/fake", fingerprint=model.fingerprint,
                        sequences=[SnapshotSequence(model.sequences[0].tokens, pairs)])
        fake_cid = st.write_snapshot(fake, ref="repair/fake", move_head=False)
    damage_object(server.store, pairs[2][1])

    code, out, _ = pf_cli(server, "repair", "repair/fake", "--json", capsys=capsys)
    assert code == 0, out
    [result] = json.loads(out)["repaired"]
    assert result["result"] == "replaced" and result["moved_refs"] == ["repair/fake"]
    with Store(server.store) as st:
        assert st.get_ref("repair/fake") == result["new_cid"] != fake_cid
        copy = st.get_snapshot(result["new_cid"])
        # The engine's own KV for these tokens: the pages of the real snapshot.
        assert copy.sequences[0].pages == model.sequences[0].pages
        assert copy.name == "repair/fake" and st.find_damage(result["new_cid"]).intact
        assert st.reflog("repair/fake")[-1].action == "repair"


def test_damaged_token_ids_are_unrepairable(server, capsys) -> None:
    tokens = random_tokens(73, 100)
    snap = pf(server, "snapshot", {"name": "repair/tokens", "token_ids": tokens})
    with Store(server.store) as st:
        digest = st.get_snapshot(snap["cid"]).sequences[0].tokens.digest
    damage_object(server.store, digest, db="blobs", fill=b"\x00")
    response = post(server, f"{PF}/repair", {"cid": "repair/tokens"})
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "unrepairable"
    code, _, err = pf_cli(server, "repair", "repair/tokens", capsys=capsys)
    assert code == 3
    assert "could not be repaired" in err
