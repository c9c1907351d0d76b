"""What crosses a process boundary, both ways, and how it is encoded.

Out, from the API server's ``Control``: an *op* in a request's ``kv_transfer_params``
(``SnapshotOp``, ``CheckoutOp``, ``CaptureOp``), read by the scheduler side in EngineCore;
from there, one ``StepPlan`` per engine step (vLLM's connector metadata) to the worker.

Back: the worker records each job's outcome in the store's ``meta`` database as a
``JobRecord`` under ``job:<id>`` (docs/format.md), because the worker has no channel of its
own to the API server, and publishes its ``EngineRecord`` there under ``engine:<id>`` when it
registers its KV cache; the scheduler side answers in the finished request's
``kv_transfer_params`` (``CheckoutReply``, ``CaptureReply``).

Everything here is a plain dataclass, so it pickles cheaply across vLLM's process
boundaries, with explicit JSON forms where it travels as JSON. This module imports neither
torch nor vLLM, so the API server side can use it without loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from .fingerprint import Fingerprint

__all__ = [
    "OP_CAPTURE",
    "OP_CHECKOUT",
    "OP_SNAPSHOT",
    "PARAMS_KEY",
    "CaptureOp",
    "CaptureReply",
    "CheckoutOp",
    "CheckoutReply",
    "EngineRecord",
    "JobError",
    "JobErrorKind",
    "JobRecord",
    "LoadJob",
    "Op",
    "SaveJob",
    "SnapshotOp",
    "StepPlan",
    "engine_meta_key",
    "job_meta_key",
    "params_for",
    "parse_op",
    "tokens_digest",
]

#: Key inside a request's ``kv_transfer_params`` that carries our instructions and replies.
PARAMS_KEY = "processfork"

OP_SNAPSHOT = "snapshot"  # copy this request's prompt blocks into the store
OP_CHECKOUT = "checkout"  # load this request's prompt blocks from a snapshot
OP_CAPTURE = "capture"  # report the engine's resident sequences (no KV work)


# --- ops: API server -> EngineCore -------------------------------------------------------------
@dataclass(frozen=True)
class SnapshotOp:
    """Save the request's first ``num_tokens`` prompt tokens, from block ``skip_blocks`` on.

    The control plane may append a token after the sequence (see ``Control``), so the
    sequence can be shorter than the prompt; ``None`` means the whole prompt. Blocks before
    ``skip_blocks`` are already in the parent snapshot.
    """

    job: str
    skip_blocks: int = 0
    num_tokens: int | None = None
    op: ClassVar[str] = OP_SNAPSHOT


@dataclass(frozen=True)
class CheckoutOp:
    """Load the request's prompt blocks from sequence ``seq`` of snapshot ``cid``."""

    job: str
    cid: str
    seq: int
    op: ClassVar[str] = OP_CHECKOUT


@dataclass(frozen=True)
class CaptureOp:
    """Answer with the token ids of the sequences the engine holds (or of one request)."""

    request_id: str | None = None
    op: ClassVar[str] = OP_CAPTURE


Op = SnapshotOp | CheckoutOp | CaptureOp


def params_for(op: Op, auth: str) -> dict[str, Any]:
    """The ``kv_transfer_params`` of an internal request that carries ``op``."""
    fields = {k: v for k, v in vars(op).items() if v is not None}
    return {PARAMS_KEY: {"op": op.op, **fields, "auth": auth}}


def parse_op(kv_transfer_params: dict[str, Any] | None, auth: str | None) -> Op | None:
    """Our op from a request's ``kv_transfer_params``, if it is authentic and well formed.

    Clients can put anything in ``kv_transfer_params`` of an OpenAI request.  Only the
    control plane knows the engine's ``engine_id`` (a random id per start), so an op that
    does not carry it is ignored: a client cannot load foreign pages into the shared
    prefix cache or write pages into the store.  A malformed op is ignored too: this runs
    inside vLLM's scheduler, which must never fail because of a request.
    """
    if not kv_transfer_params:
        return None
    params = kv_transfer_params.get(PARAMS_KEY)
    if not isinstance(params, dict) or auth is None or params.get("auth") != auth:
        return None
    try:
        kind = params.get("op")
        if kind == OP_SNAPSHOT:
            num = params.get("num_tokens")
            return SnapshotOp(
                job=_text(params["job"]),
                skip_blocks=_count(params.get("skip_blocks", 0)),
                num_tokens=None if num is None else _count(num),
            )
        if kind == OP_CHECKOUT:
            return CheckoutOp(
                job=_text(params["job"]), cid=_text(params["cid"]), seq=_count(params["seq"])
            )
        if kind == OP_CAPTURE:
            rid = params.get("request_id")
            return CaptureOp(request_id=None if rid is None else _text(rid))
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return value


# --- replies: EngineCore -> API server, in the finished request's kv_transfer_params -------------
@dataclass(frozen=True)
class CheckoutReply:
    """How a checkout request's loadable prompt blocks were served when it was admitted.

    ``loaded_tokens`` came from the store; ``local_tokens`` were in vLLM's prefix cache already.
    """

    loaded_tokens: int = 0
    local_tokens: int = 0

    def to_params(self) -> dict[str, Any]:
        return {PARAMS_KEY: {"loaded_tokens": self.loaded_tokens,
                             "local_tokens": self.local_tokens}}

    @classmethod
    def from_params(cls, kv_transfer_params: dict[str, Any] | None) -> CheckoutReply:
        """The reply; zeros when there is none (the request ended without one)."""
        reply = _reply(kv_transfer_params)
        return cls(int(reply.get("loaded_tokens", 0)), int(reply.get("local_tokens", 0)))


@dataclass(frozen=True)
class CaptureReply:
    """Token ids of every sequence the engine holds (or of the one request asked for)."""

    sequences: list[list[int]] = field(default_factory=list)

    def to_params(self) -> dict[str, Any]:
        return {PARAMS_KEY: {"sequences": self.sequences}}

    @classmethod
    def from_params(cls, kv_transfer_params: dict[str, Any] | None) -> CaptureReply:
        return cls([list(s) for s in _reply(kv_transfer_params).get("sequences", [])])


def _reply(kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    reply = (kv_transfer_params or {}).get(PARAMS_KEY)
    return reply if isinstance(reply, dict) else {}


# --- job records: worker -> API server, through the store --------------------------------------
class JobErrorKind(str, Enum):
    """Why a job failed, as far as the control plane's answer depends on it."""

    #: The disk (or quota) is full: the failed write committed nothing (HTTP 507).
    STORE_FULL = "store_full"
    #: Anything else; the message says what.
    FAILED = "failed"


@dataclass(frozen=True)
class JobError:
    kind: JobErrorKind
    #: For people: the exception's class name, then its message.
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> JobError:
        from processfork.store.errors import StoreFull

        kind = JobErrorKind.STORE_FULL if isinstance(exc, StoreFull) else JobErrorKind.FAILED
        return cls(kind, f"{type(exc).__name__}: {exc}")

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind.value, "message": self.message}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobError:
        try:
            kind = JobErrorKind(data.get("kind"))
        except ValueError:  # a kind this version does not know: still a failure
            kind = JobErrorKind.FAILED
        return cls(kind, str(data.get("message", "")))


@dataclass
class JobRecord:
    """A job's outcome, as the worker records it under ``job:<id>`` (docs/format.md).

    A save job's record is written with its final pages, in the same transaction; a failed
    job's as soon as it fails.  A successful load writes none: the scheduler side's
    ``CheckoutReply`` says what was loaded.
    """

    #: The worker ran the job's last save (with or without an error).
    final: bool = False
    #: Blocks saved so far, and how many of them were not in the store before.
    blocks: int = 0
    new_blocks: int = 0
    bytes_written: int = 0
    #: Blocks of the save whose pages the engine named from memory (it had saved or loaded
    #: them and has not written them since), without copying or hashing them.
    reused_blocks: int = 0
    #: The saved ``(K, V)`` page digests in block order; only in a final record without error.
    pages: list[tuple[str, str]] = field(default_factory=list)
    error: JobError | None = None

    @property
    def settled(self) -> bool:
        """Nothing more will happen to the job: it saved to the end, or it failed."""
        return self.final or self.error is not None

    @property
    def succeeded(self) -> bool:
        return self.final and self.error is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "final": self.final,
            "blocks": self.blocks,
            "new_blocks": self.new_blocks,
            "bytes_written": self.bytes_written,
        }
        if self.reused_blocks:
            out["reused_blocks"] = self.reused_blocks
        if self.error is not None:
            out["error"] = self.error.to_json()
        elif self.pages:
            out["pages"] = [[k, v] for k, v in self.pages]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        error = data.get("error")
        return cls(
            final=bool(data.get("final", False)),
            blocks=int(data.get("blocks", 0)),
            new_blocks=int(data.get("new_blocks", 0)),
            bytes_written=int(data.get("bytes_written", 0)),
            reused_blocks=int(data.get("reused_blocks", 0)),
            pages=[(str(k), str(v)) for k, v in data.get("pages", [])],
            error=JobError.from_json(error) if isinstance(error, dict) else None,
        )


@dataclass(frozen=True)
class EngineRecord:
    """What rank 0's worker publishes under ``engine:<id>`` when it registers its KV cache
    (docs/format.md): the API server compares snapshots with it and reports it."""

    fingerprint: Fingerprint
    #: Blocks in the engine's KV cache.
    num_blocks: int
    #: Bytes of one page: one block's K, or V, for every layer.
    page_bytes: int
    #: The worker's process id.
    pid: int

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint.to_json(), "num_blocks": self.num_blocks,
                "page_bytes": self.page_bytes, "pid": self.pid}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineRecord:
        return cls(
            fingerprint=Fingerprint.from_json(data["fingerprint"]),
            num_blocks=int(data["num_blocks"]),
            page_bytes=int(data["page_bytes"]),
            pid=int(data["pid"]),
        )


# --- step plans: EngineCore -> worker -----------------------------------------------------------
def tokens_digest(tokens: Any) -> str:
    """xxh3-128 of token ids as int32 little-endian (the store's token blob encoding)."""
    import numpy as np

    return token_bytes_digest(np.asarray(tokens, dtype="<i4").tobytes())


def token_bytes_digest(data: bytes | memoryview) -> str:
    """``tokens_digest`` of token ids already encoded as the store keeps them."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


def job_meta_key(job: str) -> str:
    """Store meta key under which the worker reports a job's outcome."""
    return f"job:{job}"


def engine_meta_key(engine_id: str) -> str:
    """Store meta key under which rank 0 publishes its ``EngineRecord``."""
    return f"engine:{engine_id}"


@dataclass
class SaveJob:
    """Copy blocks ``first_block .. first_block + len(block_ids) - 1`` of a sequence.

    ``valid_in_last`` is the number of valid token slots in the last block when that
    block is the sequence's partial tail; ``None`` means every block is full.  Saves
    of one job arrive in block order across steps (chunked prefill), so the worker
    can append digests to the job's pin as they come.

    ``background``: the pages are copied out of the blocks in the step, and written and made
    durable after it by the worker's page writer (a session turn's saves, whole blocks only:
    nobody waits for them, and the turn is committed once their records are in the store).
    ``release``: the request has finished and vLLM keeps its blocks for this save (a session
    turn's sliding windows); the worker reports it as finished sending once the blocks are
    copied, so vLLM frees them.
    ``state_group``: the blocks are states of this KV-cache group (a Mamba group): each layer's
    block holds its state and then padding, which the worker zeroes in the pages (it may hold
    what another group left in the block).
    ``durable``: False for a snapshot's saves: the API server's commit of the snapshot, which
    follows the job's record and syncs the store, makes the job's pages and record durable
    with it, so the worker's commits skip their second sync. Nothing durable names them before;
    a crash in between loses a snapshot that was never acknowledged.
    """

    job: str
    req_id: str
    first_block: int
    block_ids: list[int]
    valid_in_last: int | None = None
    final: bool = False
    background: bool = False
    release: bool = False
    state_group: int | None = None
    durable: bool = True


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
    #: loaded while the request waits (vLLM's asynchronous load): the worker reports the request
    #: in ``finished_recving`` in the step that runs the job, whether the load failed or not.
    async_load: bool = False
    #: the KV-cache group whose blocks these are (plugin/kv_groups.py); its pages are that
    #: group's pages of the sequence.
    group: int = 0


@dataclass
class StepPlan:
    """What the worker must do around one engine step (the connector metadata)."""

    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    #: Blocks this step's forward pass writes afresh (allocated for tokens no cache holds):
    #: whatever the worker remembers about their pages is void from this step on.
    fresh_blocks: list[int] = field(default_factory=list)
