"""Records that cross process boundaries: request params (API server -> EngineCore)
and connector metadata (EngineCore scheduler -> worker).

Everything here is a plain dataclass or dict so it pickles cheaply across vLLM's
process boundaries and is easy to read in a debugger.  This module imports neither
torch nor vLLM, so the API server side can use it without loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "OP_CAPTURE",
    "OP_CHECKOUT",
    "OP_SNAPSHOT",
    "PARAMS_KEY",
    "LoadJob",
    "SaveJob",
    "StepPlan",
    "engine_meta_key",
    "job_meta_key",
    "op_params",
]

#: Key inside a request's ``kv_transfer_params`` that carries our instructions.
PARAMS_KEY = "processfork"

OP_SNAPSHOT = "snapshot"  # copy this request's prompt blocks into the store
OP_CHECKOUT = "checkout"  # load this request's prompt blocks from a snapshot
OP_CAPTURE = "capture"  # report the engine's resident sequences (no KV work)


def op_params(
    kv_transfer_params: dict[str, Any] | None, auth: str | None
) -> dict[str, Any] | None:
    """Our instruction block from a request's ``kv_transfer_params``, if it is authentic.

    Clients can put anything in ``kv_transfer_params`` of an OpenAI request.  Only the
    control plane knows the engine's ``engine_id`` (a random id per start), so an op that
    does not carry it is ignored: a client cannot load foreign pages into the shared
    prefix cache or write pages into the store.
    """
    if not kv_transfer_params:
        return None
    params = kv_transfer_params.get(PARAMS_KEY)
    if not isinstance(params, dict) or auth is None or params.get("auth") != auth:
        return None
    return params


def tokens_digest(tokens: Any) -> str:
    """xxh3-128 of token ids as int32 little-endian (the store's token blob encoding)."""
    import numpy as np
    import xxhash

    return xxhash.xxh3_128_hexdigest(np.asarray(tokens, dtype="<i4").tobytes())


def job_meta_key(job: str) -> str:
    """Store meta key under which the worker reports a job's outcome."""
    return f"job:{job}"


def engine_meta_key(engine_id: str) -> str:
    """Store meta key under which rank 0 publishes its engine fingerprint."""
    return f"engine:{engine_id}"


@dataclass
class SaveJob:
    """Copy blocks ``first_block .. first_block + len(block_ids) - 1`` of a sequence.

    ``valid_in_last`` is the number of valid token slots in the last block when that
    block is the sequence's partial tail; ``None`` means every block is full.  Saves
    of one job arrive in block order across steps (chunked prefill), so the worker
    can append digests to the job's pin as they come.
    """

    job: str
    req_id: str
    first_block: int
    block_ids: list[int]
    valid_in_last: int | None = None
    final: bool = False


@dataclass
class LoadJob:
    """Fill engine blocks with pages of one sequence of a snapshot.

    ``first_block`` is the index (in the sequence) of ``block_ids[0]``; blocks before
    it were already resident in the engine's own prefix cache.
    """

    job: str
    req_id: str
    cid: str
    seq: int
    first_block: int
    block_ids: list[int]
    #: digest of the request's first ``(first_block + len(block_ids)) * block_size`` prompt
    #: tokens; the worker loads only if the snapshot's tokens hash the same.
    tokens_digest: str = ""


@dataclass
class StepPlan:
    """What the worker must do around one engine step (the connector metadata)."""

    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.loads and not self.saves
