"""The host tier: pages in a shared-memory file that outlives the engine.

The file is checked as the next engine finds it (pages kept, a killed writer's slot free, another
page size emptied, one engine at a time), and the staged page path is run through it on CPU
tensors (and CUDA ones where a GPU is present): saves leave their pages in the tier, a load after
a "restart" takes them from there byte for byte without the store's page being read, a corrupt
tier page fails its block only and leaves the tier, and a tier too small falls back to the store.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from processfork.plugin.codec import codec_for
from processfork.plugin.host_tier import HostTier, TierBusy, filesystem_type, tier_file_path
from processfork.plugin.staged_pages import StagedPagePath
from processfork.store import PutResult, Store, page_digest

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
L, B, H, N, D = 3, 40, 2, 16, 32
PAGE = 4096


def _digest(i: int) -> bytes:
    return page_digest(np.full(PAGE, i, dtype=np.uint8))


def _put(tier: HostTier, values: list[int]) -> list[int]:
    slots = tier.reserve(len(values))
    for slot, v in zip(slots, values):
        tier.rows[slot][:] = v
        tier.publish(slot, _digest(v))
    return slots


def test_pages_survive_the_engine_that_wrote_them(tmp_path):
    path = tmp_path / "tier"
    tier = HostTier(path, PAGE, 8 * PAGE)
    _put(tier, [1, 2, 3])
    tier.close()
    again = HostTier(path, PAGE, 8 * PAGE)
    slots = again.lookup([_digest(1), _digest(2), _digest(3), _digest(4)])
    assert slots[3] is None and None not in slots[:3]
    assert all(again.rows[s][0] == v for s, v in zip(slots[:3], [1, 2, 3]))
    assert len(again) == 3
    again.close()


def test_one_engine_at_a_time(tmp_path):
    tier = HostTier(tmp_path / "tier", PAGE, 4 * PAGE)
    with pytest.raises(TierBusy):
        HostTier(tmp_path / "tier", PAGE, 4 * PAGE)
    tier.close()
    HostTier(tmp_path / "tier", PAGE, 4 * PAGE).close()  # the lock goes with the first


def test_a_tier_for_other_pages_or_another_size_starts_empty(tmp_path):
    tier = HostTier(tmp_path / "tier", PAGE, 4 * PAGE)
    _put(tier, [7])
    tier.close()
    for page, capacity in ((2 * PAGE, 8 * PAGE), (PAGE, 6 * PAGE)):
        other = HostTier(tmp_path / "tier", page, capacity)
        assert len(other) == 0
        other.close()


def test_a_slot_written_without_its_digest_is_free_after_a_kill(tmp_path):
    """A writer killed between the bytes and the digest leaves a slot the next engine reuses."""
    tier = HostTier(tmp_path / "tier", PAGE, 2 * PAGE)
    (slot,) = tier.reserve(1)
    tier.rows[slot][:] = 9  # no publish: the process "dies" here
    tier.close()
    again = HostTier(tmp_path / "tier", PAGE, 2 * PAGE)
    assert len(again) == 0 and len(again.reserve(2)) == 2
    again.close()


def test_least_recently_used_pages_are_replaced_and_kept_slots_never(tmp_path):
    tier = HostTier(tmp_path / "tier", PAGE, 3 * PAGE)
    a, b, c = _put(tier, [1, 2, 3])
    tier.lookup([_digest(1)])  # 1 is now the most recent: 2 goes first
    (reused,) = tier.reserve(1)
    assert reused == b and _digest(2) not in tier
    tier.release([reused])
    waited = []
    assert tier.reserve(2, keep=[a], before_reuse=lambda: waited.append(1)) == [b, c]
    assert waited == [1] and _digest(1) in tier and _digest(3) not in tier


def test_discarded_pages_are_forgotten(tmp_path):
    tier = HostTier(tmp_path / "tier", PAGE, 2 * PAGE)
    _put(tier, [1, 2])
    tier.discard([_digest(1)])
    assert _digest(1) not in tier and _digest(2) in tier
    assert len(tier.reserve(1)) == 1
    tier.close()


def test_the_file_is_named_after_the_store_and_the_page_size(tmp_path):
    a = tier_file_path(str(tmp_path), str(tmp_path / "s1"), PAGE)
    assert a == tier_file_path(str(tmp_path), str(tmp_path / "s1" / "."), PAGE)
    assert a != tier_file_path(str(tmp_path), str(tmp_path / "s2"), PAGE)
    assert a != tier_file_path(str(tmp_path), str(tmp_path / "s1"), 2 * PAGE)


def test_the_file_system_under_a_path_is_the_deepest_mount_holding_it():
    """A CUDA engine keeps its tier only on a tmpfs: pages of a file on disk cannot be pinned."""
    assert filesystem_type("/proc/self") == "proc"
    assert filesystem_type("/") not in (None, "proc")
    if Path("/dev/shm").is_dir():
        assert filesystem_type("/dev/shm") == "tmpfs"


# -- the staged page path through the tier ------------------------------------------------------
@pytest.fixture
def tier_dir(request, tmp_path):
    """Where the tier's file goes: on CUDA a tmpfs, since CUDA pins only memory pages."""
    if request.node.callspec.params.get("device") != "cuda":
        return tmp_path
    path = Path(tempfile.mkdtemp(prefix="pf-tier-test-", dir="/dev/shm"))
    request.addfinalizer(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def _layers(device: str, *, zero: bool = False) -> list[torch.Tensor]:
    make = torch.zeros if zero else torch.randn
    phys = make(L, B, N, H, 2 * D, device=device, dtype=torch.float32).to(torch.bfloat16)
    return [phys[i].transpose(1, 2) for i in range(L)]


def _path(layers: list[torch.Tensor], tier: HostTier | None, *, chunk_blocks: int = 3
          ) -> StagedPagePath:
    codec = codec_for("FLASH_ATTN", layers, head_dim=D)
    if tier is not None and torch.cuda.is_available() and codec.device.type == "cuda":
        from processfork.plugin.host_tier import cuda_register

        tier.pin(cuda_register)
    return StagedPagePath(codec, verify=True, staging_bytes=4 * chunk_blocks * 2 * codec.page_bytes,
                          slots=4, threads=3, tier=tier)


def _page_bytes(layers: list[torch.Tensor]) -> int:
    return codec_for("FLASH_ATTN", layers, head_dim=D).page_bytes


def _save(path: StagedPagePath, store: Store, blocks: list[int]) -> list[bytes]:
    digests: list[bytes] = []

    def commit(items, n, last):
        result: PutResult = store.put_pages_hashed(items, pin="job")
        digests.extend(result.digests)

    path.save(blocks, None, commit)
    return digests


def _drop_pages_from_store(store_path, digests: list[bytes]) -> None:
    """Take pages out of the store behind its back: a load that still succeeds read the tier."""
    import lmdb

    env = lmdb.open(str(store_path), max_dbs=32, lock=False)
    pages = env.open_db(b"pages", create=False)
    with env.begin(write=True, db=pages) as txn:
        for d in digests:
            value = bytearray(txn.get(d))
            value[:] = bytes(len(value))  # zeros: the store's copy is now wrong
            txn.put(d, bytes(value))
    env.close()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_a_load_after_a_restart_comes_from_the_tier(tmp_path, tier_dir, device):
    src = _layers(device)
    blocks = [37, 2, 5, 11, 0, 23, 30, 8, 19, 1, 3]
    tier_path = tier_dir / "tier"
    with Store(tmp_path / "store") as store:
        saver = _path(src, HostTier(tier_path, _page_bytes(src), 64 * _page_bytes(src)))
        digests = _save(saver, store, blocks)
        saver.close()  # the engine stops; the tier's file stays
    _drop_pages_from_store(tmp_path / "store", digests)
    dst = _layers(device, zero=True)
    target = [4, 9, 12, 13, 14, 15, 16, 17, 18, 20, 39]
    with Store(tmp_path / "store") as store:
        loader = _path(dst, HostTier(tier_path, _page_bytes(dst), 64 * _page_bytes(dst)),
                       chunk_blocks=2)
        outcome = loader.load(store, target, digests, ["job"] * len(target))
        _sync(device)
        loader.close()
    assert not outcome.bad_blocks
    for layer_src, layer_dst in zip(src, dst):
        for b_src, b_dst in zip(blocks, target):
            assert torch.equal(layer_src[b_src], layer_dst[b_dst])


@pytest.mark.parametrize("device", DEVICES)
def test_pages_the_tier_lacks_are_read_from_the_store_and_kept(tmp_path, tier_dir, device):
    src = _layers(device)
    blocks = [1, 2, 3, 4, 5, 6, 7]
    with Store(tmp_path / "store") as store:
        digests = _save(_path(src, None), store, blocks)
        tier = HostTier(tier_dir / "tier", _page_bytes(src), 64 * _page_bytes(src))
        dst = _layers(device, zero=True)
        loader = _path(dst, tier, chunk_blocks=2)
        outcome = loader.load(store, [10, 11, 12, 13, 14, 15, 16], digests, ["j"] * 7)
        _sync(device)
        assert not outcome.bad_blocks and all(d in tier for d in digests)
        for layer_src, layer_dst in zip(src, dst):
            for b_src, b_dst in zip(blocks, range(10, 17)):
                assert torch.equal(layer_src[b_src], layer_dst[b_dst])
        loader.close()


@pytest.mark.parametrize("device", DEVICES)
def test_a_corrupt_tier_page_fails_its_block_and_leaves_the_tier(tmp_path, tier_dir, device):
    src = _layers(device)
    blocks = [1, 2, 3, 4]
    with Store(tmp_path / "store") as store:
        tier = HostTier(tier_dir / "tier", _page_bytes(src), 64 * _page_bytes(src))
        saver = _path(src, tier)
        digests = _save(saver, store, blocks)
        (slot,) = tier.lookup([digests[5]])  # block 2's V page
        tier.rows[slot][0] ^= 0xFF
        outcome = saver.load(store, [20, 21, 22, 23], digests, ["a", "a", "b", "b"])
        _sync(device)
        assert outcome.bad_blocks == {22} and set(outcome.failures) == {"b"}
        assert digests[5] not in tier and digests[4] in tier
        saver.close()


@pytest.mark.parametrize("device", DEVICES)
def test_a_tier_too_small_for_a_load_leaves_it_to_the_store(tmp_path, tier_dir, device):
    src = _layers(device)
    blocks = list(range(12))
    with Store(tmp_path / "store") as store:
        digests = _save(_path(src, None), store, blocks)
        tier = HostTier(tier_dir / "tier", _page_bytes(src), 5 * _page_bytes(src))
        dst = _layers(device, zero=True)
        loader = _path(dst, tier)
        outcome = loader.load(store, list(range(20, 32)), digests, ["j"] * 12)
        _sync(device)
        loader.close()
    assert not outcome.bad_blocks
    for layer_src, layer_dst in zip(src, dst):
        assert torch.equal(layer_src[:12], layer_dst[20:32])
