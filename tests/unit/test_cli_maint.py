"""`pf status`, `pf fsck` (exit 3 on damage) and `pf gc` (dry run against the real thing)."""

from __future__ import annotations

import re
from pathlib import Path

import lmdb
import pytest
from processfork.store import Store
from test_cli_support import PAGE, History, build_history, pf, snapshot

from processfork_dev.store_damage import damage_object, delete_object

TRIAL_TOKENS = [90, 91, 92, 93, 94, 95]  # shares no block with the history: 2 blocks, 4 pages


@pytest.fixture
def history(tmp_path: Path) -> History:
    return build_history(tmp_path / "store")


def _open_raw(path: Path) -> lmdb.Environment:
    """The store's LMDB environment, opened behind the store's back to damage it."""
    try:
        return lmdb.open(str(path), max_dbs=16, lib_version=0)
    except TypeError:  # bindings without a choice of LMDB engine
        return lmdb.open(str(path), max_dbs=16)


def test_status(history: History) -> None:
    result = pf(history.path, "status", "--json")
    assert result.exit_code == 0, result.stderr
    doc = result.json()
    assert Path(doc["path"]) == history.path
    assert doc["num_snapshots"] == 5
    assert doc["num_refs"] == 5
    assert doc["num_pages"] == 10  # base: 6, child adds 4 (its 3rd block differs, plus a 4th)
    assert doc["page_bytes"] == 10 * PAGE
    assert doc["head"] == {"ref": "main", "cid": history.child}
    human = pf(history.path, "status").stdout
    assert re.search(r"num snapshots +5\n", human) and "page bytes" in human and "640 B" in human
    assert re.search(r"abandoned pins +0\n", human)


def test_fsck_clean_store(history: History) -> None:
    result = pf(history.path, "fsck")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "no problems" in result.stderr
    assert pf(history.path, "fsck", "--json").json() == {"ok": True, "issues": []}


def test_fsck_corrupt_page_exit_3_naming_every_snapshot_and_ref_that_uses_it(
    history: History,
) -> None:
    with Store(history.path) as st:
        digest = st.get_snapshot(history.base).sequences[0].pages[0][0]
    damage_object(history.path, digest)
    users = {history.base, history.child, *history.forks}  # the first block is shared by all
    refs = ["HEAD", "base", "base/0", "base/1", "base/2", "main"]

    result = pf(history.path, "fsck")
    assert result.exit_code == 3
    [line] = result.stdout.splitlines()
    assert line.startswith(f"corrupt-page {digest}: bytes hash to ")
    assert line.endswith("; used by 5 snapshots (refs HEAD, base, base/0 and 3 more)")
    assert result.error_lines[-1] == "pf: error: fsck found 1 problem"
    assert "pf repair" in result.error_lines[0]

    as_json = pf(history.path, "fsck", "--json")
    assert as_json.exit_code == 3
    doc = as_json.json()
    assert doc["ok"] is False
    [issue] = doc["issues"]
    assert (issue["kind"], issue["object"]) == ("corrupt-page", digest)
    assert set(issue["snapshots"]) == users and len(issue["snapshots"]) == 5
    assert issue["refs"] == refs
    quiet = pf(history.path, "fsck", "-q").stdout.splitlines()
    assert quiet[0] == digest and set(quiet[1:]) == users | set(refs) and len(quiet) == 12


def test_fsck_names_the_users_of_a_missing_page_and_a_damaged_token_blob(history: History) -> None:
    with Store(history.path) as st:
        child = st.get_snapshot(history.child)
        last_page = child.sequences[0].pages[-1][1]  # the V page of the child's own last block
        tokens = child.sequences[0].tokens.digest
    delete_object(history.path, last_page)
    damage_object(history.path, tokens, db="blobs", fill=b"\x00")
    issues = {i["kind"]: i for i in pf(history.path, "fsck", "--json").json()["issues"]}
    assert issues["missing-page"]["object"] == last_page
    assert issues["missing-page"]["snapshots"] == [history.child]
    assert issues["missing-page"]["refs"] == ["HEAD", "main"]
    assert issues["corrupt-blob"]["object"] == tokens
    assert issues["corrupt-blob"]["snapshots"] == [history.child]


def test_fsck_dangling_ref_exit_3(history: History) -> None:
    env = _open_raw(history.path)
    try:
        refs = env.open_db(b"refs", create=False)
        with env.begin(write=True, db=refs) as txn:
            txn.put(b"ghost", ("sha256:" + "ab" * 32).encode())
    finally:
        env.close()
    result = pf(history.path, "fsck", "--json")
    assert result.exit_code == 3
    assert any(i["kind"] == "dangling-ref" and i["object"] == "ghost" for i in result.json()["issues"])


def _add_abandoned_trial(history: History) -> str:
    with Store(history.path) as st:
        trial = snapshot(st, "trial", TRIAL_TOKENS, ref="trial", move_head=False)
        st.delete_ref("trial")
    return trial


def test_gc_grace_period_keeps_young_objects(history: History) -> None:
    _add_abandoned_trial(history)
    result = pf(history.path, "gc", "--expire", "now", "--json")
    assert result.exit_code == 0, result.stderr
    doc = result.json()
    assert doc["removed_snapshots"] == doc["removed_pages"] == doc["removed_blobs"] == 0
    assert doc["reachable_snapshots"] == 6  # the young trial counts as a root


def test_gc_reflog_keeps_a_deleted_ref_until_it_expires(history: History) -> None:
    trial = _add_abandoned_trial(history)
    doc = pf(history.path, "gc", "--prune", "now", "--json").json()
    assert doc["removed_snapshots"] == 0
    assert pf(history.path, "show", trial, "-q").exit_code == 0


def test_gc_dry_run_then_real(history: History) -> None:
    trial = _add_abandoned_trial(history)
    dry = pf(history.path, "gc", "--dry-run", "--prune", "now", "--expire", "now", "--json")
    assert dry.exit_code == 0, dry.stderr
    planned = dry.json()
    assert planned["dry_run"] is True
    assert planned["removed_snapshots"] == 1
    assert planned["removed_pages"] == 4 and planned["removed_page_bytes"] == 4 * PAGE
    assert planned["removed_blobs"] == 2  # its token ids and its page table
    assert pf(history.path, "show", trial, "-q").exit_code == 0  # nothing deleted yet

    human = pf(history.path, "gc", "--prune", "now", "--expire", "now")
    assert human.exit_code == 0, human.stderr
    assert "gc: removed" in human.stdout
    assert "removed pages        4" in human.stdout
    assert f"removed page bytes   {4 * PAGE} B" in human.stdout

    gone = pf(history.path, "show", trial)
    assert gone.exit_code == 1 and "unknown revision" in gone.stderr
    again = pf(history.path, "gc", "--prune", "now", "--expire", "now", "--json").json()
    assert again["removed_snapshots"] == again["removed_pages"] == 0
    assert pf(history.path, "fsck").exit_code == 0
    assert pf(history.path, "log", "--all", "--json").json()["entries"][-1]["cid"] == history.base


def test_gc_sizes_are_human_readable(history: History) -> None:
    with Store(history.path) as st:
        snapshot(st, "big", list(range(500, 500 + 4 * 40)), ref="big", move_head=False)
        st.delete_ref("big")
    out = pf(history.path, "gc", "--dry-run", "--prune", "now", "--expire", "now").stdout
    assert "removed page bytes   5.0 KiB" in out  # 80 pages of 64 bytes


@pytest.mark.parametrize("option", ["--prune", "--expire"])
def test_gc_bad_age_exit_1(history: History, option: str) -> None:
    result = pf(history.path, "gc", option, "soon")
    assert result.exit_code == 1
    assert "invalid age 'soon'" in result.stderr
    assert len(result.error_lines) == 1


def test_gc_session_prefix_names_the_session_refs(history: History) -> None:
    with Store(history.path) as st:
        snapshot(st, "agents/a", list(range(600, 640)), ref="agents/a", move_head=False)
        st.record_session_prefix("agents/")
    # By default, the prefix the server recorded; --session-prefix overrides it.
    out = pf(history.path, "gc", "--dry-run", "--session-ttl", "now", "--json").json()
    assert out["expired_sessions"] == 1
    out = pf(history.path, "gc", "--dry-run", "--session-ttl", "now", "--session-prefix", "x/",
             "--json").json()
    assert out["expired_sessions"] == 0
    result = pf(history.path, "gc", "--session-ttl", "now", "--session-prefix", "")
    assert result.exit_code == 1 and len(result.error_lines) == 1
