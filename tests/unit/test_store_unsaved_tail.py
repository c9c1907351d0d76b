"""Sequences whose partial last block has no page (a session turn's): the stored form says so
(`paged_tokens`), the format record becomes version 2 with the first of them, and fsck, gc and
forks follow them like any manifest; fsck still reports every other missing page."""

from __future__ import annotations

import json

import pytest
from processfork.store import InvalidManifest, Manifest, SnapshotSequence, Store
from processfork.store.documents import snapshot_doc
from store_helpers import BLOCK, add_sequence, make_snapshot

FINGERPRINT = {"block_size": BLOCK, "model": "test"}


def _turn(store: Store, tokens: list[int], name: str = "sessions/a", **kw) -> str:
    """A session turn of ``tokens``: pages for its whole blocks only."""
    whole = len(tokens) // BLOCK * BLOCK
    seq = add_sequence(store, tokens[:whole])
    seq = SnapshotSequence(store.put_tokens(tokens), seq.pages, paged_tokens=whole)
    m = Manifest(name=name, fingerprint=FINGERPRINT, sequences=[seq], **kw)
    return store.write_snapshot(m, ref=name)


def _issues(store: Store) -> list[tuple[str, str]]:
    return [(i.kind, i.message) for i in store.fsck()]


def test_an_unsaved_tail_is_stored_explicitly_and_raises_the_format_record(tmp_path):
    with Store(tmp_path / "s") as store:
        make_snapshot(store, "plain", ref="plain")
        assert store.meta_get("format")["version"] == 1  # other snapshots keep version 1
        cid = _turn(store, list(range(3 * BLOCK + 5)))
        assert store.meta_get("format")["version"] == 2  # version-1 readers refuse the store
        [stored] = json.loads(store.get_snapshot(cid).canonical_bytes())["sequences"]
        assert stored["paged_tokens"] == 3 * BLOCK and stored["pages"]["count"] == 3
        assert stored["tokens"]["count"] == 3 * BLOCK + 5
        back = store.get_snapshot(cid)
        assert back.cid == cid and back.sequences[0].tokens_with_pages == 3 * BLOCK
        assert Manifest.from_dict(back.to_dict()).cid == cid
        assert _issues(store) == []
        doc = snapshot_doc(store, cid, back)
        assert doc["num_tokens"] == 3 * BLOCK + 5
        assert doc["sequences"][0]["blocks"] == 3
        assert doc["sequences"][0]["unsaved_tail_tokens"] == 5


def test_fsck_reports_a_missing_whole_block_but_not_the_unsaved_tail(tmp_path):
    with Store(tmp_path / "s") as store:
        cid = _turn(store, list(range(2 * BLOCK + 9)))
        assert _issues(store) == []
        k, _ = store.get_snapshot(cid).sequences[0].pages[1]
        store.env.write(lambda txn: txn.delete(bytes.fromhex(k), db=store.dbs["pages"]))
        issues = list(store.fsck())
        assert [(i.kind, i.object) for i in issues] == [("missing-page", k)]
        assert "block 1 of sequence 0" in issues[0].message


def test_fsck_reports_paged_tokens_that_are_not_the_whole_blocks(tmp_path):
    with Store(tmp_path / "s") as store:
        tokens = list(range(3 * BLOCK + 5))
        pages = add_sequence(store, tokens[: 2 * BLOCK]).pages
        # Pages for two blocks while the sequence has three whole ones: a whole block unsaved.
        seq = SnapshotSequence(store.put_tokens(tokens), pages, paged_tokens=2 * BLOCK)
        store.write_snapshot(Manifest(name="bad", fingerprint=FINGERPRINT, sequences=[seq]))
        [(kind, detail)] = _issues(store)
        assert kind == "bad-block-count" and "not the sequence's whole blocks" in detail


def test_gc_keeps_the_pages_and_a_fork_keeps_the_unsaved_tail(tmp_path):
    with Store(tmp_path / "s") as store:
        cid = _turn(store, list(range(4 * BLOCK + 1)))
        [child] = store.fork("sessions/a", 1)
        seq = store.get_snapshot(child).sequences[0]
        assert seq.paged_tokens == 4 * BLOCK and seq.pages == store.get_snapshot(
            cid).sequences[0].pages
        store.gc()
        assert _issues(store) == []
        assert all(store.has_pages([bytes.fromhex(d) for d in pair]) == [True, True]
                   for pair in seq.pages)


@pytest.mark.parametrize("paged", [-1, 40, 41, True, "32"])
def test_paged_tokens_must_be_below_the_token_count(paged):
    seq = {"tokens": {"count": 40, "digest": "0" * 32}, "pages": [["1" * 32, "2" * 32]],
           "paged_tokens": paged}
    with pytest.raises(InvalidManifest, match="paged_tokens"):
        SnapshotSequence.from_dict(seq)


def test_a_stored_sequence_with_an_unknown_field_is_still_refused():
    from processfork.store.manifest import stored_sequences

    ref = {"count": 40, "digest": "0" * 32}
    ok = {"tokens": ref, "pages": {"count": 2, "digest": "1" * 32}, "paged_tokens": 32}
    assert stored_sequences({"format": "paged-batchinvariant-v1", "sequences": [ok]})
    with pytest.raises(InvalidManifest):
        stored_sequences({"format": "paged-batchinvariant-v1",
                          "sequences": [{**ok, "unsaved": True}]})
