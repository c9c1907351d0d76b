"""Finding a snapshot's damaged objects, clearing damaged pages, and committing a repaired copy."""

from __future__ import annotations

from pathlib import Path

import pytest
from processfork.store import Manifest, SnapshotSequence, Store
from test_cli_support import History, build_history, page_bytes

from processfork_dev.store_damage import damage_object, delete_object


@pytest.fixture
def history(tmp_path: Path) -> History:
    return build_history(tmp_path / "store")


def test_an_intact_snapshot_has_no_damage(history: History) -> None:
    with Store(history.path) as st:
        damage = st.find_damage(history.child)
    assert damage.intact and not damage.recomputable


def test_damaged_and_missing_pages_are_found_and_only_damaged_ones_cleared(history: History) -> None:
    with Store(history.path) as st:
        pages = st.get_snapshot(history.child).sequences[0].pages
    corrupt, missing, sound = pages[0][0], pages[1][1], pages[2][0]
    damage_object(history.path, corrupt, fill=b"\xff")
    delete_object(history.path, missing)
    with Store(history.path) as st:
        damage = st.find_damage(history.child)
        assert set(damage.pages) == {corrupt, missing}
        assert damage.sequences == (0,) and damage.recomputable
        # Only a record that still fails its hash is deleted; sound and absent ones stay as they are.
        assert st.clear_damaged_pages([corrupt, missing, sound]) == [corrupt]
        assert st.has_pages([bytes.fromhex(d) for d in (corrupt, missing, sound)]) == [
            False, False, True
        ]
        # Writing the right bytes again restores the page for every snapshot that names it.
        tokens = st.get_tokens(st.get_snapshot(history.child).sequences[0].tokens)
        restored = st.put_pages([page_bytes("K", tokens, 4)]).digests[0].hex()
        assert restored == corrupt
        # base shares the child's first two blocks: the restored page counts for it too.
        assert st.find_damage(history.base).pages == (missing,)


def test_damaged_token_ids_are_not_recomputable(history: History) -> None:
    with Store(history.path) as st:
        digest = st.get_snapshot(history.child).sequences[0].tokens.digest
    damage_object(history.path, digest, db="blobs", fill=b"\x00")
    with Store(history.path) as st:
        damage = st.find_damage(history.child)
    assert damage.tokens == (digest,) and not damage.recomputable and not damage.intact


def test_a_replacement_takes_over_every_ref_and_a_detached_head(history: History) -> None:
    with Store(history.path) as st:
        st.set_ref("also-base", history.base)
        st.checkout_head(history.base)  # detached at base
        old = st.get_snapshot(history.base)
        tokens = st.get_tokens(old.sequences[0].tokens)
        pages = st.put_pages([page_bytes("X", tokens, 4), page_bytes("Y", tokens, 4)]).digests
        seqs = [SnapshotSequence(old.sequences[0].tokens, [(pages[0].hex(), pages[1].hex()),
                                                   *old.sequences[0].pages[1:]])]
        copy = Manifest(name=old.name, parents=old.parents, fingerprint=old.fingerprint,
                        sequences=seqs)
        new, moved = st.write_replacement(copy, replaces=history.base, message="repair test")
        assert moved == ["also-base", "base", "HEAD"]
        assert st.get_ref("base") == st.get_ref("also-base") == new
        assert st.head().cid == new and st.head().ref is None
        assert st.get_ref("base/0") == history.forks[0]  # other snapshots' refs stay
        assert st.reflog("base")[-1].action == "repair"
        assert list(st.fsck()) == []


def test_fsck_skips_what_repair_cleared_in_a_snapshot_it_replaced(history: History) -> None:
    """Repair clears a damaged page and commits a copy whose refs take over; the damaged snapshot
    stays for its reflog entries. fsck does not report the page it lacks (a store is clean
    after a repair), and gc drops the record of the replacement with the snapshot."""
    with Store(history.path) as st:
        old = st.get_snapshot(history.child)
        tokens = st.get_tokens(old.sequences[0].tokens)
    corrupt = old.sequences[0].pages[3][0]  # block [13-15]: the child's alone
    damage_object(history.path, corrupt, fill=b"\xff")
    with Store(history.path) as st:
        assert st.clear_damaged_pages([corrupt]) == [corrupt]
        assert [i.kind for i in st.fsck()] == ["missing-page"]
        page = st.put_pages([page_bytes("Z", tokens, 12)]).digests[0].hex()
        seqs = [SnapshotSequence(old.sequences[0].tokens,
                                 [*old.sequences[0].pages[:3], (page, old.sequences[0].pages[3][1])])]
        copy = Manifest(name=old.name, parents=old.parents, fingerprint=old.fingerprint,
                        sequences=seqs)
        new, moved = st.write_replacement(copy, replaces=history.child, message="repair test")
        assert "main" in moved and list(st.fsck()) == []
        records = st.meta_items("replaced:")
        assert list(records) == ["replaced:" + history.child.removeprefix("sha256:")]
        assert next(iter(records.values()))["by"] == new
        stats = st.gc(prune="now", expire="now")  # the reflogs expire: the damaged one goes
        assert stats.removed_snapshots >= 1 and not st.has_snapshot(history.child)
        assert st.meta_items("replaced:") == {} and list(st.fsck()) == []
