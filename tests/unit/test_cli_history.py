"""`pf log` (plain, --all, -n, --graph, --json, -q) and `pf reflog` on a real store."""

from __future__ import annotations

from pathlib import Path

import pytest
from processfork.store import Store
from test_cli_support import History, build_history, pf, snapshot


@pytest.fixture
def history(tmp_path: Path) -> History:
    return build_history(tmp_path / "store")


def test_log_shows_head_history_newest_first(history: History) -> None:
    result = pf(history.path, "log")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(history.child.removeprefix("sha256:")[:12])
    assert "(HEAD -> main)" in lines[0] and " child " in lines[0]
    assert lines[1].startswith(history.base.removeprefix("sha256:")[:12])
    assert "(base)" in lines[1]
    assert result.stderr == ""


def test_log_all_includes_forks_and_limit(history: History) -> None:
    everything = pf(history.path, "log", "--all", "--json").json()
    cids = [e["cid"] for e in everything["entries"]]
    assert set(cids) == {history.base, history.child, *history.forks}
    assert cids[-1] == history.base  # the root comes after all its children

    limited = pf(history.path, "log", "--all", "-n", "2", "-q")
    assert limited.exit_code == 0
    assert limited.stdout.splitlines() == cids[:2]


def test_log_json_document(history: History) -> None:
    doc = pf(history.path, "log", "--json").json()
    assert doc["head"] == {"ref": "main", "cid": history.child}
    first, second = doc["entries"]
    assert first["cid"] == history.child and first["head"] is True
    assert first["refs"] == ["main"]
    assert first["parents"] == [history.base]
    assert first["num_tokens"] == 15 and first["num_sequences"] == 1
    assert second["head"] is False and second["fork"] is None


def test_log_of_a_ref_and_global_json_option_before_the_command(history: History) -> None:
    after = pf(history.path, "log", "base/1", "--json")
    before = pf(history.path, "--json", "log", "base/1")
    assert after.exit_code == before.exit_code == 0
    assert after.json() == before.json()
    entries = after.json()["entries"]
    assert [e["cid"] for e in entries] == [history.forks[1], history.base]
    assert entries[0]["fork"] == {"index": 1, "of": 3}


def test_log_graph_draws_the_fork_tree(history: History) -> None:
    result = pf(history.path, "log", "--graph", "--all")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(1 for line in lines if "*" in line) == 5
    # Four children of base: each branch line joins back with a `|/` connector, and base comes last.
    assert sum(1 for line in lines if line.strip() == "|/") == 3
    assert lines[-1].startswith("* " + history.base.removeprefix("sha256:")[:12])
    assert any(line.startswith("| * ") for line in lines)
    for fork_cid in history.forks:
        assert any(fork_cid.removeprefix("sha256:")[:12] in line for line in lines)


def test_log_graph_json_pairs_prefixes_with_cids(history: History) -> None:
    doc = pf(history.path, "log", "--graph", "--all", "--json").json()
    rows = doc["graph"]
    assert [r["cid"] for r in rows if r["cid"]] == [e["cid"] for e in doc["entries"]]
    assert all(r["graph"].startswith(("*", "|")) for r in rows)


def test_log_graph_shows_a_merge(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store(path) as st:
        root = snapshot(st, "root", [1, 2, 3, 4])
        left = snapshot(st, "left", [1, 2, 3, 4, 5], parents=[root], ref="left")
        right = snapshot(st, "right", [1, 2, 3, 4, 6], parents=[root], ref="right")
        snapshot(st, "merged", [1, 2, 3, 4, 5, 6], parents=[left, right], ref="merged")
    lines = pf(path, "log", "--graph").stdout.splitlines()
    assert lines[0].startswith("* ") and "merged" in lines[0]
    assert lines[1] == "|\\"
    assert lines[-1].startswith("* ") and "root" in lines[-1]


def test_log_of_empty_store(tmp_path: Path) -> None:
    with Store(tmp_path / "empty"):
        pass
    result = pf(tmp_path / "empty", "log", "--json")
    assert result.exit_code == 0
    assert result.json()["entries"] == []
    human = pf(tmp_path / "empty", "log")
    assert human.exit_code == 0 and human.stdout == ""
    assert "pf log --all" in human.stderr


def test_log_unknown_ref_is_one_line_exit_1(history: History) -> None:
    result = pf(history.path, "log", "no-such-ref")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.error_lines) == 1
    assert "unknown revision 'no-such-ref'" in result.stderr
    assert "Traceback" not in result.stderr


def test_reflog_newest_first(history: History) -> None:
    with Store(history.path) as st:
        st.set_ref("main", history.base, message="rewind")
    result = pf(history.path, "reflog", "main", "--json")
    assert result.exit_code == 0
    entries = result.json()["entries"]
    assert [e["new"] for e in entries] == [history.base, history.child]
    assert entries[0]["old"] == history.child and entries[0]["message"] == "rewind"
    human = pf(history.path, "reflog", "main").stdout.splitlines()
    assert human[0].startswith(history.base.removeprefix("sha256:")[:12] + " main@{")
    assert "rewind" in human[0]
    assert pf(history.path, "reflog", "main", "-n", "1", "-q").stdout.splitlines() == [history.base]


def test_ref_at_n_names_where_a_ref_pointed_n_moves_ago(history: History) -> None:
    with Store(history.path) as store:
        store.set_ref("main", history.forks[1])  # main: ..., child, then base/1's snapshot
    now = pf(history.path, "show", "main@{0}", "--json").json()["cid"]
    before = pf(history.path, "show", "main@{1}", "--json").json()["cid"]
    assert (now, before) == (history.forks[1], history.child)
    assert pf(history.path, "show", "main@{1}~1", "--json").json()["cid"] == history.base
    head = pf(history.path, "show", "HEAD@{0}", "--json").json()["cid"]
    assert head == pf(history.path, "show", "HEAD", "--json").json()["cid"]
    reflog = pf(history.path, "reflog", "main").stdout.splitlines()
    assert " main@{0}: " in reflog[0] and " main@{1}: " in reflog[1]
    missing = pf(history.path, "show", "main@{99}")
    assert missing.exit_code == 1 and "main@{99}" in missing.stderr


def test_log_graph_separates_unrelated_histories(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store(path) as st:
        a = snapshot(st, "a", [1, 2, 3], ref="a")
        snapshot(st, "a2", [1, 2, 3, 4], parents=[a], ref="a")
        snapshot(st, "b", [7, 8, 9], ref="b")  # a root of its own, newest
    lines = pf(path, "log", "--graph", "--all").stdout.splitlines()
    stars = [i for i, line in enumerate(lines) if line.startswith("*")]
    assert len(stars) == 3
    # b is a root: the next history starts after a blank line, not right under it.
    assert "b" in lines[stars[0]].split() and lines[stars[0] + 1] == ""
    assert stars[1] == stars[0] + 2
    # a2 -> a is one history: no gap between them.
    assert stars[2] == stars[1] + 1


def test_log_lists_fork_children_by_fork_index(history: History) -> None:
    entries = pf(history.path, "log", "--all", "--json").json()["entries"]
    forks = [e for e in entries if e["fork"] is not None]
    assert [e["fork"]["index"] for e in forks] == [0, 1, 2]
