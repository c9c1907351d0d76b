"""`pf show`, `pf diff`, `pf fork` and revision parsing (full cids, prefixes, refs, errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
from processfork.store import Manifest, Store
from test_cli_support import PAGE, History, bare, build_history, pf


@pytest.fixture
def history(tmp_path: Path) -> History:
    return build_history(tmp_path / "store")


@pytest.mark.parametrize(
    "form",
    ["ref", "full", "bare", "prefix7", "sha-prefix", "head", "parent"],
)
def test_show_accepts_every_revision_form(history: History, form: str) -> None:
    rev = {
        "ref": "base",
        "full": history.base,
        "bare": bare(history.base),
        "prefix7": bare(history.base)[:7],
        "sha-prefix": "sha256:" + bare(history.base)[:9],
        "head": "HEAD~1",
        "parent": "main~1",
    }[form]
    result = pf(history.path, "show", rev, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["cid"] == history.base


def test_show_summary(history: History) -> None:
    doc = pf(history.path, "show", "main", "--json").json()
    assert doc["name"] == "child"
    assert doc["parents"] == [history.base]
    assert doc["fork"] is None
    assert doc["refs"] == ["main"]
    assert doc["num_tokens"] == 15 and doc["num_sequences"] == 1
    assert doc["num_blocks"] == 4  # 15 tokens in blocks of 4
    assert doc["num_pages"] == 8  # a K and a V page per block, all distinct
    assert doc["bytes"] == 8 * PAGE
    assert doc["sequences"] == [
        {"tokens": 15, "token_digest": doc["sequences"][0]["token_digest"], "blocks": 4, "pages": 8,
         "unsaved_tail_tokens": 0}
    ]
    assert doc["fingerprint"]["model"] == "tiny-llama"

    human = pf(history.path, "show", "main")
    assert human.exit_code == 0
    assert history.child in human.stdout
    assert "15 in 1 sequence(s)" in human.stdout
    assert "8 distinct in 4 blocks (K and V), 512 B" in human.stdout
    assert "tiny-llama" in human.stdout


def test_show_fork_child_and_quiet(history: History) -> None:
    doc = pf(history.path, "show", "base/2", "--json").json()
    assert doc["fork"] == {"index": 2, "of": 3}
    assert doc["parents"] == [history.base]
    assert pf(history.path, "show", "base/2", "-q").stdout == history.forks[2] + "\n"


@pytest.mark.parametrize("rev", ["nope", "0000000", "abc", "sha256:zz"])
def test_show_unknown_revision_exit_1_one_line(history: History, rev: str) -> None:
    result = pf(history.path, "show", rev)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.error_lines) == 1
    assert result.error_lines[0].startswith("pf: error: ")
    assert "Traceback" not in result.stderr


def _ambiguous_pair() -> tuple[Manifest, Manifest]:
    """Two snapshots whose cids share their first 7 hex digits (birthday search, about 20k tries)."""
    seen: dict[str, Manifest] = {}
    i = 0
    while True:
        m = Manifest(name=f"amb-{i}", created="2026-01-01T00:00:00.000000Z")
        key = bare(m.cid)[:7]
        if key in seen:
            return seen[key], m
        seen[key] = m
        i += 1


def test_ambiguous_prefix_exit_1_lists_candidates(tmp_path: Path) -> None:
    a, b = _ambiguous_pair()
    path = tmp_path / "store"
    with Store(path) as st:
        st.write_snapshot(a, ref="a")
        st.write_snapshot(b, ref="b")
    prefix = bare(a.cid)[:7]
    result = pf(path, "show", prefix)
    assert result.exit_code == 1
    assert len(result.error_lines) == 1
    assert "ambiguous" in result.stderr
    assert bare(a.cid)[:12] in result.stderr and bare(b.cid)[:12] in result.stderr
    # One more digit (where they differ) resolves.
    longer = bare(a.cid)[: next(i for i in range(7, 64) if a.cid[7 + i] != b.cid[7 + i]) + 1]
    assert pf(path, "show", longer, "--json").json()["cid"] == a.cid


def test_diff_child_against_base(history: History) -> None:
    result = pf(history.path, "diff", "base", "main", "--json")
    assert result.exit_code == 0, result.stderr
    doc = result.json()
    assert doc["a"] == history.base and doc["b"] == history.child
    assert doc["common_prefix_tokens"] == 10
    assert doc["first_divergent_index"] == 10
    assert doc["token_a"] is None and doc["token_b"] == 11
    # base's last block is partial (tokens 9-10), so the child rewrote it: 2 blocks shared.
    assert doc["shared_pages"] == 4 and doc["unique_a"] == 2 and doc["unique_b"] == 4
    assert doc["shared_bytes"] == 4 * PAGE and doc["unique_b_bytes"] == 4 * PAGE

    human = pf(history.path, "diff", "base", "main").stdout
    assert "10 tokens" in human
    assert "at token 10: A ends, 11 in B" in human
    assert f"4 ({4 * PAGE} B)" in human


def test_diff_identical(history: History) -> None:
    doc = pf(history.path, "diff", "base", "base/0", "--json").json()
    assert doc["first_divergent_index"] is None
    assert doc["unique_a"] == doc["unique_b"] == 0
    assert "identical" in pf(history.path, "diff", "base", "base/0").stdout


def test_fork_prints_names_and_cids_one_per_line(history: History) -> None:
    result = pf(history.path, "fork", "main", "-n", "4")
    assert result.exit_code == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [r[0] for r in rows] == [f"main/{i}" for i in range(4)]
    cids = [r[1] for r in rows]
    assert len(cids) == 4 and len(set(cids)) == 4
    assert all(c.startswith("sha256:") for c in cids)
    with Store(history.path, readonly=True) as st:
        for i, cid in enumerate(cids):
            assert st.get_ref(f"main/{i}") == cid
            m = st.get_snapshot(cid)
            assert m.parents == [history.child]
            assert m.page_digests() == st.get_snapshot(history.child).page_digests()


def test_fork_name_prefix_and_json(history: History) -> None:
    result = pf(history.path, "fork", bare(history.child)[:10], "-n", "2", "--name", "trial", "--json")
    assert result.exit_code == 0, result.stderr
    cids = result.json()["cids"]
    assert len(cids) == 2 and result.json()["names"] == ["trial/0", "trial/1"]
    refs = pf(history.path, "refs", "--json").json()["refs"]
    assert {r["name"]: r["cid"] for r in refs}["trial/1"] == cids[1]


@pytest.mark.parametrize("args", [["-n", "0"], [], ["-n", "x"]])
def test_fork_bad_count_is_a_one_line_usage_error(history: History, args: list[str]) -> None:
    result = pf(history.path, "fork", "base", *args)
    assert result.exit_code == 2  # click's usage-error convention
    assert len(result.error_lines) == 1
    assert "pf fork --help" in result.stderr


def test_fork_bad_name_exit_1(history: History) -> None:
    result = pf(history.path, "fork", "base", "-n", "2", "--name", "bad name")
    assert result.exit_code == 1
    assert "invalid name" in result.stderr
    assert len(result.error_lines) == 1


def test_fork_by_cid_is_named_after_the_one_ref_at_it(history: History) -> None:
    """`pf fork <cid>` where only `main` points: main/0, main/1 (the README's next step works)."""
    doc = pf(history.path, "fork", bare(history.child)[:12], "-n", "2", "--json").json()
    assert doc["names"] == ["main/0", "main/1"]
    with Store(history.path) as st:
        st.set_ref("other", history.child)  # now two refs point at it: the short cid it is
    doc = pf(history.path, "fork", bare(history.child)[:12], "-n", "1", "--json").json()
    assert doc["names"] == [f"{bare(history.child)[:12]}/0"]
