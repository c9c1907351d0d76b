"""Fork a snapshot, continue each branch differently, snapshot the branches: only suffixes are new."""

from __future__ import annotations

import json

import pytest
from pf_http import cached_tokens, complete, pf, random_tokens
from processfork.store import Store
from typer.testing import CliRunner

from processfork_cli.app import app
from processfork_cli.main import run

pytestmark = pytest.mark.integration

BLOCK = 32
BASE_LEN = 300  # 9 whole blocks + 12 tokens: the branches diverge inside block 9
CONTINUATION = 40


@pytest.fixture(scope="module")
def tree(server):
    base_tokens = random_tokens(4000, BASE_LEN)
    base = pf(server, "snapshot", {"name": "tree", "token_ids": base_tokens})
    children = pf(server, "fork", {"cid": "tree", "n": 3})["cids"]
    branches = []
    for i, child in enumerate(children):
        sampled = complete(
            server, base_tokens, max_tokens=CONTINUATION, temperature=1.0, seed=100 + i,
            return_token_ids=True,
        )
        tokens = base_tokens + sampled["choices"][0]["token_ids"]
        snap = pf(server, "snapshot", {"name": f"tree/{i}", "token_ids": tokens})
        branches.append({"fork": child, "tokens": tokens, "snapshot": snap})
    return {"base": base, "base_tokens": base_tokens, "children": children, "branches": branches}


def test_fork_children_share_every_page(tree, pf_store):
    with Store(pf_store, readonly=True) as store:
        base = store.get_snapshot(tree["base"]["cid"])
        for i, cid in enumerate(tree["children"]):
            child = store.get_snapshot(cid)
            assert child.parents == [tree["base"]["cid"]]
            assert child.fork.index == i and child.fork.of == 3
            assert [s.pages for s in child.sequences] == [s.pages for s in base.sequences]


def test_branches_differ(tree):
    continuations = {tuple(b["tokens"][BASE_LEN:]) for b in tree["branches"]}
    assert len(continuations) >= 2, "different seeds should sample different continuations"


def test_branch_snapshots_write_only_their_suffix(tree, pf_store):
    shared_blocks = BASE_LEN // BLOCK
    with Store(pf_store, readonly=True) as store:
        base_pages = store.get_snapshot(tree["base"]["cid"]).sequences[0].pages
        for branch in tree["branches"]:
            snap = branch["snapshot"]
            suffix_blocks = -(-len(branch["tokens"]) // BLOCK) - shared_blocks
            assert snap["parents"] == [branch["fork"]]
            assert snap["new_pages"] == suffix_blocks
            pages = store.get_snapshot(snap["cid"]).sequences[0].pages
            assert pages[:shared_blocks] == base_pages[:shared_blocks]
            assert len(pages) == shared_blocks + suffix_blocks


def test_branch_continues_from_its_checkout(server, tree):
    branch = tree["branches"][1]
    pf(server, "checkout", {"cid": "tree/1"})
    again = complete(server, branch["tokens"], max_tokens=1)
    assert cached_tokens(again) == (len(branch["tokens"]) - 1) // BLOCK * BLOCK


def test_log_graph_shows_the_tree(tree, pf_store):
    result = CliRunner().invoke(app, ["--store", str(pf_store), "log", "--graph", "--all"])
    assert result.exit_code == 0, result.output
    out = result.output
    for i in range(3):
        assert f"tree/{i}" in out
    assert "tree" in out
    assert "|\\" in out or "|/" in out  # branches drawn, not a flat list


def test_cli_drives_the_server(server, tree, tmp_path, capsys):
    """`pf snapshot`, `pf checkout` and `pf fork/log/show/refs --via-server` over HTTP."""
    runner = CliRunner()
    remote = ["--server", server.base_url]
    if server.api_key:
        remote += ["--api-key", server.api_key]
    prompt_file = tmp_path / "ctx.txt"
    prompt_file.write_text("A context for the command line. " * 30)

    made = runner.invoke(app, [*remote, "--json", "snapshot", "cli-base", "--prompt-file",
                               str(prompt_file)])
    assert made.exit_code == 0, made.output
    cid = json.loads(made.stdout)["cid"]
    assert cid.startswith("sha256:")

    checked = runner.invoke(app, [*remote, "--json", "checkout", cid[7:19]])
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["cid"] == cid

    forked = runner.invoke(app, [*remote, "fork", "cli-base", "-n", "2", "--via-server"])
    assert forked.exit_code == 0, forked.output
    rows = [line.split() for line in forked.stdout.splitlines()]
    assert [r[0] for r in rows] == ["cli-base/0", "cli-base/1"]
    assert all(r[1].startswith("sha256:") for r in rows)

    for command in (["log", "--via-server", "-n", "3"], ["show", "cli-base", "--via-server"],
                    ["refs", "--via-server"]):
        result = runner.invoke(app, [*remote, *command])
        assert result.exit_code == 0, (command, result.output)
        assert "cli-base" in result.output

    capsys.readouterr()
    assert run([*remote, "checkout", "no-such-ref"]) == 1  # HTTP 404 -> user error, one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-ref" in err[0]
