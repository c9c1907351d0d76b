"""The staged page path (the GPU path) on synthetic KV tensors and a real store.

It runs on CPU tensors everywhere and on CUDA tensors where a GPU is present: saves are cut into
chunks that flow through the staging slots, loads come back byte for byte into other blocks, a
corrupt page fails its block only, and a partial last block is saved with its tail zeroed.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from processfork.plugin import page_file
from processfork.plugin.codec import codec_for
from processfork.plugin.head_pages import split_heads
from processfork.plugin.staged_pages import StagedPagePath
from processfork.store import MissingObject, PutResult, Store, page_digest

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
L, B, H, N, D = 3, 40, 2, 16, 32


def _layers(device: str, *, zero: bool = False) -> list[torch.Tensor]:
    """vLLM's FlashAttention layout: logical [B, H, N, 2D], physically [B, N, H, 2D]."""
    make = torch.zeros if zero else torch.randn
    phys = make(L, B, N, H, 2 * D, device=device, dtype=torch.float32).to(torch.bfloat16)
    return [phys[i].transpose(1, 2) for i in range(L)]


def _path(layers: list[torch.Tensor], *, chunk_blocks: int, threads: int = 3,
          verify: bool = True, run_bytes: int = page_file.RUN_BYTES,
          remember: bool = False, native: bool = True, reader: str = "auto") -> StagedPagePath:
    codec = codec_for("FLASH_ATTN", layers, head_dim=D)
    return StagedPagePath(codec, verify=verify, staging_bytes=4 * chunk_blocks * 2 * codec.page_bytes,
                          slots=4, threads=threads, run_bytes=run_bytes, remember=remember,
                          native=native, reader=reader)


def _save(path: StagedPagePath, store: Store, blocks: list[int], tail: int | None = None,
          present=None) -> tuple[list[bytes], list[tuple[int, bool]]]:
    digests: list[bytes] = []
    calls: list[tuple[int, bool]] = []

    def commit(items, n, last):
        result: PutResult = store.put_pages_hashed(items, pin="job")
        digests.extend(result.digests)
        calls.append((n, last))

    path.reused = path.save(blocks, tail, commit, present=present)
    return digests, calls


#: How the copy threads read: a slice per call in C without the GIL, out of the store's map or
#: with ``pread``; one Python call per page to read and one to hash; or runs of adjacent pages
#: per ``preadv``.
READERS = {"map": {"reader": "map"}, "pread": {"reader": "pread"}, "per_page": {"native": False},
           "runs": {"run_bytes": 1 << 20, "reader": "pread"}}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("device", DEVICES)
def test_save_then_load_moves_exactly_those_blocks_through_many_chunks(tmp_path, device,
                                                                       reader):
    src = _layers(device)
    blocks = [37, 2, 5, 11, 0, 23, 30, 8, 19, 1, 3]  # 11 blocks in chunks of 3: 4 chunks
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=3, native=reader != "per_page")
        assert path.chunk_blocks == 3
        digests, calls = _save(path, store, blocks)
        path.close()
        # 4 chunks of at most 3 blocks, committed in order, several per commit when ready.
        assert sum(n for n, _ in calls) == len(blocks) and [last for _, last in calls][-1]
        assert not any(last for _, last in calls[:-1]) and all(n > 0 for n, _ in calls)
        assert len(digests) == 2 * len(blocks)
        dst = _layers(device, zero=True)
        target = [4, 9, 12, 13, 14, 15, 16, 17, 18, 20, 39]
        loader = _path(dst, chunk_blocks=2, **READERS[reader])
        assert loader.from_map == (reader == "map")
        outcome = loader.load(store, target, digests, ["job"] * len(target))
        if device == "cuda":
            torch.cuda.synchronize()
        loader.close()
    assert not outcome.bad_blocks and not outcome.failures
    for layer_src, layer_dst in zip(src, dst):
        for b_src, b_dst in zip(blocks, target):
            assert torch.equal(layer_src[b_src], layer_dst[b_dst])
        untouched = [b for b in range(B) if b not in target]
        assert layer_dst[untouched].abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_pages_are_the_same_bytes_as_the_codecs_own_gather(tmp_path, device):
    """The staged path stores what the codec's one-shot gather stores: the format is unchanged."""
    src = _layers(device)
    blocks = [3, 1, 4, 15, 9]
    codec = codec_for("FLASH_ATTN", src, head_dim=D)
    staging = codec.gather(blocks, codec.new_staging(len(blocks)))
    rows = staging.view(torch.uint8).numpy().reshape(2 * len(blocks), -1)
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=2)
        digests, _ = _save(path, store, blocks)
        path.close()
    assert digests == [page_digest(r) for r in rows]


@pytest.mark.parametrize("device", DEVICES)
def test_pages_of_one_kv_head_are_the_codecs_gather_cut_into_heads(tmp_path, device):
    """A tensor-parallel rank's save (``heads``): K then V of each head of each block, cut from
    the staged bytes after the tail of a partial last block is zeroed, in chunks that split
    the save between blocks; and the rank remembers every head's pages of a full block."""
    src = _layers(device)
    blocks, valid = [3, 1, 4, 15, 9], 7
    codec = codec_for("FLASH_ATTN", src, head_dim=D)
    staging = codec.gather(blocks, codec.new_staging(len(blocks)))
    codec.mask_tail(staging[-1], valid)
    rows = split_heads(codec, staging).view(torch.uint8).numpy().reshape(2 * H * len(blocks), -1)
    digests: list[bytes] = []
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=2, remember=True)

        def commit(items, n, last):
            digests.extend(store.put_pages_hashed(items, pin="job").digests)

        path.save(blocks, valid, commit, present=store.has_pages, heads=H)
        assert digests == [page_digest(r) for r in rows]
        assert all(len(store.get_page(d)) == codec.page_bytes // H for d in digests)
        again: list[bytes] = []

        def commit_again(items, n, last):
            again.extend(store.put_pages_hashed(items, pin="job").digests)

        # Every full block named from memory; the partial one copied and cut again.
        assert path.save(blocks, valid, commit_again, present=store.has_pages, heads=H) == 4
        # Remembered as head pages: a save of whole-block pages copies them again.
        assert path.save(blocks[:2], None, commit_again, present=store.has_pages) == 0
        path.close()
    assert again[: len(digests)] == digests


@pytest.mark.parametrize("device", DEVICES)
def test_partial_last_block_is_saved_with_its_tail_zeroed(tmp_path, device):
    src = _layers(device)
    blocks, valid = [6, 7, 8], 5
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=2)
        digests, _ = _save(path, store, blocks, tail=valid)
        path.close()
        k_last = torch.frombuffer(bytearray(store.get_page(digests[-2])), dtype=torch.bfloat16)
    k = k_last.view(L, H, N, D)
    expected = src[0][8][..., :D].cpu()
    assert torch.equal(k[0, :, :valid], expected[:, :valid])
    assert k[:, :, valid:].abs().sum() == 0  # slots past the sequence's end: zero, every layer


def _damage(store_path, digest: bytes) -> None:
    """Damage one stored page in place, as a bad disk would: rewrite the LMDB value's bytes."""
    import lmdb

    env = lmdb.open(str(store_path), max_dbs=32, lock=False)
    pages = env.open_db(b"pages", create=False)
    with env.begin(write=True, db=pages) as txn:
        value = bytearray(txn.get(digest))
        value[0] ^= 0xFF
        txn.put(digest, bytes(value))
    env.close()


@pytest.mark.parametrize("reader", sorted(READERS))
def test_verify_catches_a_page_whose_bytes_do_not_match_its_digest(tmp_path, reader):
    src = _layers("cpu")
    blocks = [1, 2, 3, 4, 5]
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=2)
        digests, _ = _save(path, store, blocks)
        path.close()
    _damage(tmp_path / "store", digests[5])
    with Store(tmp_path / "store") as store:
        dst = _layers("cpu", zero=True)
        loader = _path(dst, chunk_blocks=2, **READERS[reader])
        assert loader.from_map == (reader == "map")
        outcome = loader.load(store, [10, 11, 12, 13, 14], digests, ["a", "a", "b", "b", "b"])
        unverified = _path(_layers("cpu", zero=True), chunk_blocks=2, verify=False)
        quiet = unverified.load(store, [10, 11, 12, 13, 14], digests, ["a"] * 5)
        loader.close()
        unverified.close()
    assert outcome.bad_blocks == {12}  # block index 2 holds page 5 (its V page)
    assert set(outcome.failures) == {"b"}
    assert not quiet.bad_blocks
    for layer_src, layer_dst in zip(src, dst):
        for b_src, b_dst in zip([1, 2, 4, 5], [10, 11, 13, 14]):
            assert torch.equal(layer_src[b_src], layer_dst[b_dst])


@pytest.mark.parametrize("device", DEVICES)
def test_a_page_the_store_lacks_fails_its_block_only_while_later_chunks_load(tmp_path, device):
    """Copies out of the map look their pages up a chunk at a time while the threads copy
    the chunks found before; a page missing from a later chunk (one that reuses a slot) fails
    its own block, and every other block, before and after it, loads byte for byte."""
    src = _layers(device)
    blocks = list(range(1, 12))  # 11 blocks in chunks of 2: 6 chunks through 4 slots
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=2)
        digests, _ = _save(path, store, blocks)
        path.close()
        gone = digests[2 * 9]  # the K page of the 10th block, in chunk 4 (slot 0 again)
        store.env.write(lambda txn: txn.delete(gone, db=store.dbs["pages"]))
        dst = _layers(device, zero=True)
        target = list(range(20, 31))
        loader = _path(dst, chunk_blocks=2, threads=2, reader="map")
        assert loader.reports_missing_pages
        outcome = loader.load(store, target, digests, ["a"] * 5 + ["b"] * 6)
        if device == "cuda":
            torch.cuda.synchronize()
        loader.close()
    assert outcome.bad_blocks == {29}
    assert set(outcome.failures) == {"b"} and "MissingObject" in outcome.failures["b"]
    assert gone.hex() in outcome.failures["b"]
    for layer_src, layer_dst in zip(src, dst):
        for b_src, b_dst in zip(blocks, target):
            if b_dst != 29:
                assert torch.equal(layer_src[b_src], layer_dst[b_dst])


def test_a_failing_commit_is_raised_after_the_writer_stops(tmp_path):
    path = _path(_layers("cpu"), chunk_blocks=2)
    seen = []

    def commit(items, n, last):
        seen.append(n)
        if len(seen) == 2:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        path.save([1, 2, 3, 4, 5, 6, 7], None, commit)
    # The path is usable again afterwards.
    seen.clear()
    path.save([1, 2], None, lambda items, n, last: seen.append(n))
    path.close()
    assert seen == [2]


def test_chunks_already_stored_are_committed_as_digests_and_free_their_slots(tmp_path):
    """A save into a store that holds every page hands the writer digests only, so it can take
    many chunks per commit; the pages are pinned all the same, and one that vanished fails."""
    src = _layers("cpu")
    blocks = list(range(12))
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=2)
        digests, _ = _save(path, store, blocks)
        seen: list[tuple[bytes, object]] = []

        def commit(items, n, last):
            seen.extend(items)
            store.put_pages_hashed(items, pin="again")

        path.save(blocks, None, commit, present=store.has_pages)
        assert [d for d, _ in seen] == digests and all(page is None for _, page in seen)
        assert store.get_pin("again") == digests

        def vanished(wanted):  # says every page is stored, but the last never was
            return [True] * len(wanted)

        src[0][11] += 1  # block 11's pages now differ from anything stored
        with pytest.raises(MissingObject):
            path.save([11], None, lambda items, n, last: store.put_pages_hashed(items),
                      present=vanished)
        path.close()


def test_a_corrupt_page_inside_a_run_fails_its_block_only(tmp_path, monkeypatch):
    """Pages saved in one commit lie one after another and are read many per ``preadv``; a bad
    disk's damage to one of them, in place, still fails that page's block alone."""
    src = _layers("cpu")
    blocks = list(range(10))
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=10)
        digests, _ = _save(path, store, blocks)
        path.close()
        offsets = store.with_page_locations(
            digests, lambda views, base, _: page_file.PageFile(0, base).offsets(views))
        page_bytes = path.page_bytes
    # in order, a small gap apart
    assert all(0 <= b - a - page_bytes < 1 << 16 for a, b in itertools.pairwise(offsets))
    data = os.open(tmp_path / "store" / "data.mdb", os.O_RDWR)
    try:
        os.pwrite(data, b"\xff\x00\xff", offsets[7] + 100)  # block 3's V page
    finally:
        os.close(data)
    calls: list[int] = []
    real = os.preadv
    monkeypatch.setattr(page_file.os, "preadv",
                        lambda fd, bufs, at: calls.append(len(bufs)) or real(fd, bufs, at))
    with Store(tmp_path / "store") as store:
        dst = _layers("cpu", zero=True)
        loader = _path(dst, chunk_blocks=10, threads=2, run_bytes=1 << 20, reader="pread")
        target = list(range(20, 30))
        outcome = loader.load(store, target, digests, ["a"] * 3 + ["b"] + ["a"] * 6)
        loader.close()
    assert outcome.bad_blocks == {23} and set(outcome.failures) == {"b"}
    assert len(calls) == 2 and all(n > 2 for n in calls)  # one run per thread
    for layer_src, layer_dst in zip(src, dst):
        for b_src, b_dst in zip(blocks, target):
            if b_dst != 23:
                assert torch.equal(layer_src[b_src], layer_dst[b_dst])


# -- blocks remembered from earlier saves and loads ------------------------------------------
def _digests_of(layers: list[torch.Tensor], blocks: list[int]) -> list[bytes]:
    """The pages the path would store for the blocks as they are now."""
    fresh = _path(layers, chunk_blocks=2)
    seen: list[bytes] = []
    fresh.save(blocks, None, lambda items, n, last: seen.extend(d for d, _ in items))
    fresh.close()
    return seen


def test_a_remembered_block_is_named_without_a_copy_until_it_is_forgotten(tmp_path):
    """The second save of the same blocks copies nothing: it names the pages the first one
    stored, even though the blocks changed (the engine would have said so: here it did not).
    Once told, the path copies the changed blocks again and names the rest from memory."""
    src = _layers("cpu")
    blocks = [7, 3, 9, 12, 1, 30, 31]  # chunks of 2: copied runs are cut, remembered ones not
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=2, remember=True)
        first, _ = _save(path, store, blocks, present=store.has_pages)
        assert path.reused == 0
        for layer in src:
            layer[[9, 30]] += 1  # what a forward pass writing blocks 9 and 30 afresh does
        again, calls = _save(path, store, blocks, present=store.has_pages)
        assert path.reused == len(blocks) and again == first  # memory, not the blocks' bytes
        assert calls[-1][1] and sum(n for n, _ in calls) == len(blocks)
        path.forget([9, 30])
        third, _ = _save(path, store, blocks, present=store.has_pages)
        assert path.reused == len(blocks) - 2
        assert third == _digests_of(src, blocks) != first
        assert store.has_pages(third) == [True] * len(third)
        path.close()


def test_nothing_is_named_from_memory_without_a_store_lookup_or_when_not_remembering(tmp_path):
    src = _layers("cpu")
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=2, remember=True)
        _save(path, store, [1, 2, 3], present=store.has_pages)
        _save(path, store, [1, 2, 3])  # no lookup: a writer that must have every page's bytes
        assert path.reused == 0
        path.close()
        forgetful = _path(src, chunk_blocks=2)
        _save(forgetful, store, [1, 2, 3], present=store.has_pages)
        _save(forgetful, store, [1, 2, 3], present=store.has_pages)
        assert forgetful.reused == 0
        forgetful.close()


def test_a_page_the_store_lost_and_a_partial_last_block_are_copied_again(tmp_path):
    src = _layers("cpu")
    blocks = [4, 5, 6, 7]
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=2, remember=True)
        first, _ = _save(path, store, blocks, present=store.has_pages)
        lost = first[2]  # block 5's K page: a snapshot deleted, its pages collected

        def present(digests):
            return [d != lost and there for d, there in zip(digests, store.has_pages(digests))]

        _save(path, store, blocks, present=present)
        assert path.reused == 3
        # A partial last block is stored with its tail zeroed; the engine's block is not that.
        _, _ = _save(path, store, blocks, tail=5, present=store.has_pages)
        assert path.reused == 3
        masked, _ = _save(path, store, blocks, tail=5, present=store.has_pages)
        assert path.reused == 3 and masked[:6] == first[:6] and masked[6:] != first[6:]
        path.close()


def test_loaded_blocks_are_remembered_only_when_their_pages_were_verified(tmp_path):
    src = _layers("cpu")
    blocks = [1, 2, 3, 4]
    with Store(tmp_path / "store") as store:
        saver = _path(src, chunk_blocks=2)
        digests, _ = _save(saver, store, blocks)
        saver.close()
    _damage(tmp_path / "store", digests[3])  # block index 1's V page: its load fails
    with Store(tmp_path / "store") as store:
        for verify, expected in ((True, 3), (False, 0)):
            dst = _layers("cpu", zero=True)
            loader = _path(dst, chunk_blocks=2, remember=True, verify=verify)
            outcome = loader.load(store, [20, 21, 22, 23], digests, ["job"] * 4)
            assert outcome.bad_blocks == ({21} if verify else set())
            loaded, _ = _save(loader, store, [20, 21, 22, 23], present=store.has_pages)
            assert loader.reused == expected
            if verify:  # the failed block's bytes are copied: what it holds, not what it was sent
                assert loaded[:2] == digests[:2] and loaded[4:] == digests[4:]
                assert loaded[2:4] == _digests_of(dst, [21])
            loader.close()


def test_a_load_into_remembered_blocks_replaces_what_they_held(tmp_path):
    src = _layers("cpu")
    with Store(tmp_path / "store") as store:
        path = _path(src, chunk_blocks=2, remember=True)
        _save(path, store, [1, 2], present=store.has_pages)
        second, _ = _save(path, store, [3, 4], present=store.has_pages)
        path.load(store, [1, 2], second, ["job", "job"])  # blocks 1, 2 now hold 3's and 4's pages
        again, _ = _save(path, store, [1, 2], present=store.has_pages)
        assert path.reused == 2 and again == second
        assert _digests_of(src, [1, 2]) == second
        path.close()


@pytest.mark.parametrize("device", DEVICES)
def test_the_warm_up_starts_every_copy_thread_and_leaves_every_block_as_it_was(device):
    layers = _layers(device)
    before = [layer.clone() for layer in layers]
    path = _path(layers, chunk_blocks=3, threads=4)
    try:
        assert path.warm_up() >= 0
        assert len(path._pool._threads) == 4  # none left to start inside the first load
        for layer, was in zip(layers, before):
            assert torch.equal(layer.view(torch.int16), was.view(torch.int16))
    finally:
        path.close()
