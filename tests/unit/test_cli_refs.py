"""`pf refs` / `pf branch` and `pf ref set|delete` on a real store."""

from __future__ import annotations

from pathlib import Path

import pytest
from processfork.store import Store
from test_cli_support import History, bare, build_history, pf


@pytest.fixture
def history(tmp_path: Path) -> History:
    return build_history(tmp_path / "store")


def test_refs_table_marks_head(history: History) -> None:
    result = pf(history.path, "refs")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ref", "cid", "name", "tokens"]
    rows = {}
    for line in lines[1:]:
        parts = line.split()
        rows[parts[1] if parts[0] == "*" else parts[0]] = line
    assert set(rows) == {"base", "base/0", "base/1", "base/2", "main"}
    assert rows["main"].startswith("*")
    assert rows["main"].split()[1:] == ["main", bare(history.child)[:12], "child", "15"]
    assert not rows["base"].startswith("*")


def test_refs_json_and_quiet(history: History) -> None:
    doc = pf(history.path, "refs", "--json").json()
    assert doc["head"] == {"ref": "main", "cid": history.child}
    by_name = {r["name"]: r for r in doc["refs"]}
    assert by_name["main"] == {
        "name": "main", "cid": history.child, "head": True, "snapshot": "child",
        "num_tokens": 15, "missing": False,
    }
    assert by_name["base/0"]["cid"] == history.forks[0]
    quiet = pf(history.path, "refs", "-q").stdout.splitlines()
    assert quiet == sorted(by_name)


def test_branch_without_arguments_lists_like_refs(history: History) -> None:
    assert pf(history.path, "branch", "--json").json() == pf(history.path, "refs", "--json").json()


def test_refs_detached_head(history: History) -> None:
    with Store(history.path) as st:
        st.checkout_head(history.base)
    lines = pf(history.path, "refs").stdout.splitlines()
    assert "(HEAD detached)" in lines[1] and bare(history.base)[:12] in lines[1]
    assert not any(line.startswith("*  main") for line in lines)


def test_branch_create_refuses_existing_then_force_moves(history: History) -> None:
    created = pf(history.path, "branch", "keep", "base/1", "--json")
    assert created.exit_code == 0, created.stderr
    assert created.json() == {"ref": "keep", "cid": history.forks[1], "old": None}

    again = pf(history.path, "branch", "keep", "base")
    assert again.exit_code == 1
    assert "already exists" in again.stderr and len(again.error_lines) == 1

    moved = pf(history.path, "branch", "keep", "base", "-f", "-q")
    assert moved.exit_code == 0 and moved.stdout == history.base + "\n"
    with Store(history.path, readonly=True) as st:
        assert st.get_ref("keep") == history.base
        assert [e.action for e in st.reflog("keep")] == ["branch", "branch"]


def test_branch_default_rev_is_head(history: History) -> None:
    assert pf(history.path, "branch", "here").exit_code == 0
    with Store(history.path, readonly=True) as st:
        assert st.get_ref("here") == history.child


def test_branch_delete_and_head_guard(history: History) -> None:
    deleted = pf(history.path, "branch", "-d", "base/2")
    assert deleted.exit_code == 0, deleted.stderr
    assert "deleted base/2" in deleted.stderr
    assert "base/2" not in [r["name"] for r in pf(history.path, "refs", "--json").json()["refs"]]

    guarded = pf(history.path, "branch", "-d", "main")
    assert guarded.exit_code == 1
    assert "HEAD points to 'main'" in guarded.stderr
    assert pf(history.path, "branch", "-d", "main", "-f").exit_code == 0

    missing = pf(history.path, "branch", "-d", "base/2")
    assert missing.exit_code == 1 and "no ref named 'base/2'" in missing.stderr


def test_ref_set_compare_and_swap(history: History) -> None:
    stale = pf(history.path, "ref", "set", "base/0", "main", "--old", "base/1")
    assert stale.exit_code == 1
    assert "changed concurrently" in stale.stderr and len(stale.error_lines) == 1

    ok = pf(history.path, "ref", "set", "base/0", "main", "--old", bare(history.forks[0])[:8])
    assert ok.exit_code == 0, ok.stderr
    exists = pf(history.path, "ref", "set", "base/0", "base", "--create")
    assert exists.exit_code == 1
    assert pf(history.path, "ref", "set", "fresh", "base", "--create").exit_code == 0
    with Store(history.path, readonly=True) as st:
        assert st.get_ref("base/0") == history.child
        assert st.get_ref("fresh") == history.base


def test_ref_delete_with_old(history: History) -> None:
    wrong = pf(history.path, "ref", "delete", "base/1", "--old", "base")
    assert wrong.exit_code == 1
    assert pf(history.path, "ref", "delete", "base/1", "--old", "base/1", "--json").json() == {
        "ref": "base/1", "deleted": history.forks[1],
    }


@pytest.mark.parametrize("name", ["bad name", "-x", "a..b", "HEAD"])
def test_invalid_ref_names_exit_1(history: History, name: str) -> None:
    result = pf(history.path, "ref", "set", "--", name, "base")
    assert result.exit_code == 1, result.stderr
    assert "invalid name" in result.stderr
    assert len(result.error_lines) == 1


def test_ref_set_unknown_rev_exit_1(history: History) -> None:
    result = pf(history.path, "ref", "set", "x", "deadbeef00")
    assert result.exit_code == 1
    assert "unknown revision 'deadbeef00'" in result.stderr


def test_ref_group_without_subcommand_shows_help(history: History) -> None:
    result = pf(history.path, "ref")
    assert result.exit_code == 0
    assert "set" in result.stdout and "delete" in result.stdout


def test_refs_sort_numbers_by_value(history: History) -> None:
    with Store(history.path) as store:
        for i in (10, 3, 11):
            store.set_ref(f"base/{i}", history.forks[0])
    quiet = pf(history.path, "refs", "-q").stdout.splitlines()
    assert quiet == ["base", "base/0", "base/1", "base/2", "base/3", "base/10", "base/11", "main"]


def test_reset_moves_an_existing_ref_back_with_a_reflog_entry(history: History) -> None:
    moved = pf(history.path, "reset", "main", "main~1", "--json")
    assert moved.exit_code == 0, moved.stderr
    assert moved.json() == {"ref": "main", "cid": history.base, "old": history.child}
    with Store(history.path, readonly=True) as st:
        assert st.get_ref("main") == history.base
        assert st.reflog("main")[-1].action == "reset"
    stale = pf(history.path, "reset", "main", history.child, "--old", "base/1")
    assert stale.exit_code == 1 and "changed concurrently" in stale.stderr
    missing = pf(history.path, "reset", "nosuch", "main")
    assert missing.exit_code == 1 and "no ref named 'nosuch'" in missing.stderr
