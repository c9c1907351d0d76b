"""Which KV heads each tensor-parallel rank of an engine holds, and how the ranks' parts of one
save job make one job record.

Pages of one KV head (format v4) are saved by each rank for its own heads, in the same engine
step, each rank under a job record of its own; the API server commits the snapshot only once
every rank's record is final, and gathers their pages into the v4 page table's order
(docs/format.md#meta-job-records). This module imports neither torch nor vLLM: the API server
uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .jobs import JobError, JobErrorKind, JobRecord, job_meta_key

__all__ = ["RankHeads", "gather_ranks", "rank_job_meta_key"]


@dataclass(frozen=True)
class RankHeads:
    """The model's KV heads that rank ``rank`` of ``tp_size`` holds, as vLLM shards them: a
    contiguous share of ``total // tp_size`` heads, or, past one rank per head, a replica of
    head ``rank // (tp_size // total)``."""

    total: int
    tp_size: int
    rank: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.tp_size:
            raise ValueError(f"rank {self.rank} is not one of {self.tp_size} ranks")
        if self.total % self.tp_size and self.tp_size % self.total:
            raise ValueError(f"{self.total} KV heads do not split evenly over "
                             f"{self.tp_size} ranks")

    @property
    def replicas(self) -> int:
        """Ranks that hold each head: 1 unless heads are replicated."""
        return max(1, self.tp_size // self.total)

    @property
    def first(self) -> int:
        if self.replicas > 1:
            return self.rank // self.replicas
        return self.rank * (self.total // self.tp_size)

    @property
    def count(self) -> int:
        return 1 if self.replicas > 1 else self.total // self.tp_size

    @property
    def writes(self) -> bool:
        """Whether this rank saves its heads: replicas compute the same bytes, so the first
        replica of each head saves it and the others only load."""
        return self.rank % self.replicas == 0

    def entries(self, block: int) -> range:
        """This rank's entries of a v4 page table among the ``block``-th stored block's."""
        start = block * self.total + self.first
        return range(start, start + self.count)


def rank_job_meta_key(job: str, rank: int) -> str:
    """Where rank ``rank`` reports its part of a job: rank 0 under the job's own key (so a TP-1
    engine's records are what they always were), rank ``r`` under ``job:<id>.r<r>``."""
    return job_meta_key(job) if rank == 0 else f"{job_meta_key(job)}.r{rank}"


def gather_ranks(records: Sequence[JobRecord | None], total_heads: int) -> JobRecord | None:
    """One save job's record from its ranks' records (``records[r]`` is rank ``r``'s, None
    while it has written none): failed when any rank failed, final when every rank is, and
    then with every head's pages of every block in v4 page-table order. None while no rank
    has reported."""
    if all(r is None for r in records):
        return None
    tp = len(records)
    for record in records:
        if record is not None and record.error is not None:
            return JobRecord(final=all(r is not None and r.final for r in records),
                             error=record.error)
    done = [r for r in records if r is not None]
    if len(done) < tp or not all(r.final for r in done):
        return JobRecord(final=False, blocks=min(r.blocks for r in done))
    shares = [RankHeads(total_heads, tp, rank) for rank in range(tp)]
    writers = [(s, r) for s, r in zip(shares, done) if s.writes]
    blocks = {len(r.pages) // s.count for s, r in writers}
    if len(blocks) != 1 or any(len(r.pages) % s.count for s, r in writers):
        sizes = ", ".join(f"rank {s.rank}: {len(r.pages)}" for s, r in writers)
        return JobRecord(final=True, error=JobError(
            JobErrorKind.FAILED, f"RankMismatch: the ranks saved different blocks ({sizes} "
                                 "page pairs)"))
    n = blocks.pop()
    pages = []
    for block in range(n):
        for s, r in writers:  # the writers' shares cover heads 0..total-1 in order
            pages += r.pages[block * s.count : (block + 1) * s.count]
    return JobRecord(
        final=True, blocks=n, pages=pages,
        # A block is new when any of its heads' pages was: at least the most any rank saw.
        new_blocks=max(r.new_blocks for _, r in writers),
        bytes_written=sum(r.bytes_written for r in done),
        # A block is named from memory, not copied, only where every rank named its heads so.
        reused_blocks=min(r.reused_blocks for _, r in writers),
    )
