"""How the parts of one save job that the ranks of a tensor-parallel engine record make one
job record: final only when every rank's is, failed when any rank's is, pages in the order of a
v4 page table (every head of block 0, then of block 1, ...)."""

from __future__ import annotations

from processfork.plugin.jobs import JobError, JobErrorKind, JobRecord
from processfork.plugin.tp_ranks import gather_ranks, rank_job_meta_key


def _pairs(rank: int, blocks: int, heads: int) -> list[tuple[str, str]]:
    """Distinct digests naming the rank, block and head: ``r1b0h1`` padded to 32 hex digits."""
    return [(f"{rank:x}{b:x}{h:x}0".ljust(32, "0"), f"{rank:x}{b:x}{h:x}1".ljust(32, "0"))
            for b in range(blocks) for h in range(heads)]


def test_rank_records_have_keys_of_their_own_and_rank_0_keeps_the_jobs():
    assert rank_job_meta_key("ab" * 16, 0) == "job:" + "ab" * 16
    assert rank_job_meta_key("ab" * 16, 3) == "job:" + "ab" * 16 + ".r3"


def test_final_ranks_gather_into_the_v4_page_table_order():
    r0 = JobRecord(final=True, blocks=3, new_blocks=2, bytes_written=100, pages=_pairs(0, 3, 2))
    r1 = JobRecord(final=True, blocks=3, new_blocks=3, bytes_written=50, pages=_pairs(1, 3, 2))
    out = gather_ranks([r0, r1], total_heads=4)
    assert out is not None and out.succeeded
    assert (out.blocks, out.new_blocks, out.bytes_written) == (3, 3, 150)
    # Block b: rank 0's heads 0, 1 then rank 1's heads 2, 3.
    assert out.pages == [p for b in range(3)
                         for p in r0.pages[2 * b : 2 * b + 2] + r1.pages[2 * b : 2 * b + 2]]


def test_replicas_that_do_not_save_add_nothing_but_must_finish():
    # Four ranks over two heads: ranks 0 and 2 save heads 0 and 1, ranks 1 and 3 only load.
    saving = [JobRecord(final=True, blocks=2, pages=_pairs(r, 2, 1)) for r in (0, 2)]
    idle = JobRecord(final=True)
    out = gather_ranks([saving[0], idle, saving[1], idle], total_heads=2)
    assert out is not None and out.pages == [saving[0].pages[0], saving[1].pages[0],
                                             saving[0].pages[1], saving[1].pages[1]]
    waiting = gather_ranks([saving[0], None, saving[1], idle], total_heads=2)
    assert waiting is not None and not waiting.settled


def test_a_job_is_settled_only_when_every_rank_is_or_one_failed():
    assert gather_ranks([None, None], total_heads=2) is None
    part = JobRecord(final=True, blocks=1, pages=_pairs(0, 1, 1))
    assert not gather_ranks([part, None], total_heads=2).settled
    failure = JobError(JobErrorKind.STORE_FULL, "StoreFull: the disk is full")
    failed = gather_ranks([part, JobRecord(error=failure)], total_heads=2)
    assert failed.settled and not failed.succeeded and failed.error == failure
    # Ranks that disagree on the blocks they saved do not make a snapshot.
    short = JobRecord(final=True, blocks=1, pages=_pairs(1, 1, 1))
    long = JobRecord(final=True, blocks=2, pages=_pairs(0, 2, 1))
    bad = gather_ranks([long, short], total_heads=2)
    assert bad.settled and not bad.succeeded and "different blocks" in bad.error.message
