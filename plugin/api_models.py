"""Request bodies and replies of the control plane (``/v1/processfork/...``).

Unknown fields are refused (400, naming the field and the closest known one): a misspelt
``promt`` must not turn a snapshot of one prompt into a snapshot of the whole engine.

Every route's reply is a ``Reply`` model, in the shape docs/http-api.md shows: the routes
validate what they answer against it, and FastAPI documents it (``/openapi.json``).
The read-only routes answer the documents of ``processfork.store.documents`` (what ``pf ... --json``
prints), validated as they are: a reply model forbids fields it does not name, so the two cannot
drift apart unnoticed.
"""

from __future__ import annotations

from typing import Any, Literal

from processfork.store.status import StoreStatus
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_serializer, model_validator

from .fingerprint import Fingerprint

__all__ = [
    "MAX_REVISION_CHARS",
    "CheckoutBody",
    "CheckoutResponse",
    "DeleteRefResponse",
    "EngineStatus",
    "ErrorDetail",
    "ErrorResponse",
    "FetchBody",
    "FetchResponse",
    "ForkBody",
    "ForkPosition",
    "ForkResponse",
    "Head",
    "LogEntry",
    "LogResponse",
    "PullBody",
    "PullResponse",
    "PushBody",
    "PushResponse",
    "RefEntry",
    "RefUpdate",
    "RefsResponse",
    "RepairBody",
    "RepairResponse",
    "Reply",
    "SequenceSummary",
    "SnapshotBody",
    "SnapshotResponse",
    "SnapshotSummary",
    "StatusResponse",
]

#: A revision (cid, prefix, ref name with ~N or @{N}) longer than this cannot name a snapshot: ref
#: names stop at 255 bytes and a cid has 71 characters. (It also bounds the work of parsing one.)
MAX_REVISION_CHARS = 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_absent(cls, data: Any) -> Any:
        """`"token_ids": null` must not read as "no source" (a snapshot of everything)."""
        if isinstance(data, dict):
            nulls = sorted(k for k, v in data.items() if v is None and k in cls.model_fields)
            if nulls:
                raise ValueError(f"{', '.join(nulls)}: null is not a value; leave the field out")
        return data


class SnapshotBody(_Body):
    """What to capture: one of ``prompt``, ``messages``, ``token_ids``, ``request_id``,
    or none of them for the engine's whole resident state."""

    name: str = Field(min_length=1, max_length=255)
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    token_ids: list[StrictInt] | None = None
    request_id: str | None = None
    parent: str | None = Field(default=None, max_length=MAX_REVISION_CHARS)
    message: str | None = None
    # With `messages`, as in a chat completion request: they shape the rendered tokens.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SnapshotBody:
        given = [
            k for k in ("prompt", "messages", "token_ids", "request_id") if getattr(self, k) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give at most one of prompt, messages, token_ids, request_id (got {given})")
        if self.token_ids is not None and (not self.token_ids or min(self.token_ids) < 0):
            raise ValueError("token_ids must be a non-empty list of non-negative integers")
        if self.prompt is not None and not self.prompt:
            raise ValueError("prompt must not be empty")
        chat_only = [k for k in ("tools", "tool_choice", "add_generation_prompt",
                                 "continue_final_message", "chat_template_kwargs")
                     if getattr(self, k) is not None]
        if chat_only and self.messages is None:
            raise ValueError(f"{', '.join(chat_only)} apply to messages only")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages must not be empty")
            for i, message in enumerate(self.messages):
                if not isinstance(message.get("role"), str):
                    raise ValueError(f"messages[{i}].role must be a string")  # noqa: TRY004
                if not isinstance(message.get("content"), (str, list, type(None))):
                    raise ValueError(  # noqa: TRY004 - pydantic reports ValueError as 422
                        f"messages[{i}].content must be a string or a list of parts"
                    )
        return self


class ForkBody(_Body):
    cid: str = Field(min_length=1, max_length=MAX_REVISION_CHARS)
    n: StrictInt = Field(ge=1, le=4096)  # `true` and `2.0` are not counts
    name: str | None = None


class CheckoutBody(_Body):
    cid: str = Field(min_length=1, max_length=MAX_REVISION_CHARS)


class RepairBody(_Body):
    """The snapshot to repair: its damaged pages are recomputed from its token ids."""

    cid: str = Field(min_length=1, max_length=MAX_REVISION_CHARS)


class ResetBody(_Body):
    """Move the existing ref ``ref`` to ``rev``; with ``old``, only if it names that now."""

    ref: str = Field(min_length=1, max_length=MAX_REVISION_CHARS)
    rev: str = Field(min_length=1, max_length=MAX_REVISION_CHARS)
    old: str | None = Field(default=None, min_length=1, max_length=MAX_REVISION_CHARS)


class _RemoteBody(_Body):
    """Which remote: a name of the store's remotes (`pf remote add`); left out, the server's
    own (`pf serve --remote`). A URL is refused: a client does not point the server's
    credentials at a bucket of its choosing."""

    remote: str | None = Field(default=None, min_length=1, max_length=64)
    #: Refs to move (default: push HEAD's ref; fetch and pull every remote ref).
    refs: list[str] | None = Field(default=None, max_length=4096)


class PushBody(_RemoteBody):
    all: bool = False
    force: bool = False


class FetchBody(_RemoteBody):
    pass


class PullBody(_RemoteBody):
    force: bool = False


# --- replies ------------------------------------------------------------------------------------
class Reply(BaseModel):
    """A reply: its JSON is ``model_dump(mode="json", exclude_unset=True)``, in field order.

    A field that has a default is one that only some replies carry (``RepairResponse``); a reply
    that does not set it leaves it out."""

    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class SnapshotResponse(Reply):
    cid: str
    name: str
    parents: list[str]
    num_sequences: int
    num_tokens: int
    #: Blocks, over all sequences (each a K and a V page).
    num_pages: int
    #: Blocks of which a page was not in the store before.
    new_pages: int
    bytes_written: int
    #: Blocks the engine named without copying them out: it had saved or loaded their pages
    #: and has not written the blocks since (GPU engines, and CPU ones on the staged path).
    reused_pages: int = 0
    ms: float


class ForkResponse(Reply):
    """``cids[i]`` is the ref ``names[i]``, in fork order."""

    cids: list[str]
    names: list[str]


class CheckoutResponse(Reply):
    ok: Literal[True]
    cid: str
    name: str
    num_sequences: int
    num_tokens: int
    pages_loaded: int
    tokens_loaded: int
    tokens_already_resident: int
    ms: float


class RepairResponse(Reply):
    cid: str
    damaged_pages: int
    result: Literal["intact", "restored", "replaced"]
    #: With ``restored`` and ``replaced``.
    cleared_pages: int = 0
    recomputed_sequences: int = 0
    #: With ``replaced``: the repaired copy, and the refs (and ``HEAD``) moved to it.
    new_cid: str = ""
    moved_refs: list[str] = Field(default_factory=list)
    ms: float


class ForkPosition(Reply):
    index: int
    of: int


class SequenceSummary(Reply):
    tokens: int
    token_digest: str
    #: Blocks with pages.
    blocks: int
    #: Distinct K and V pages.
    pages: int
    #: Tokens of a session turn's partial last block, which has no page (0 for any other).
    unsaved_tail_tokens: int = 0


class SnapshotSummary(Reply):
    """``GET /snapshots/{rev}`` and ``pf show --json``."""

    cid: str
    name: str
    format: str
    parents: list[str]
    fork: ForkPosition | None
    created: str
    refs: list[str]
    num_sequences: int
    num_tokens: int
    num_blocks: int
    num_pages: int
    bytes: int
    #: As the snapshot stored it: the engine's ``Fingerprint`` when it was taken.
    fingerprint: dict[str, Any]
    sequences: list[SequenceSummary]


class Head(Reply):
    """``ref`` when HEAD points to a ref, else None and HEAD is detached at ``cid``."""

    ref: str | None
    cid: str | None


class LogEntry(Reply):
    cid: str
    name: str
    parents: list[str]
    fork: ForkPosition | None
    created: str
    num_sequences: int
    num_tokens: int
    refs: list[str]
    head: bool


class LogResponse(Reply):
    head: Head
    entries: list[LogEntry]


class RefEntry(Reply):
    name: str
    cid: str
    #: HEAD points to this ref.
    head: bool
    #: The snapshot's name and size; None when the store does not have it (``missing``).
    snapshot: str | None
    num_tokens: int | None
    missing: bool


class RefsResponse(Reply):
    head: Head
    refs: list[RefEntry]


class ResetResponse(Reply):
    ref: str
    #: What the ref names now, and what it named before.
    cid: str
    old: str


class DeleteRefResponse(Reply):
    deleted: str
    #: What the ref named.
    cid: str


class RefUpdate(Reply):
    ref: str
    old: str | None
    new: str
    #: created, fast-forward, forced or up-to-date (a push); also diverged (a pull: not moved).
    status: str


class PushResponse(Reply):
    """What ``pf push --json`` prints."""

    url: str
    refs: list[RefUpdate]
    objects: int
    pages: int
    blobs: int
    snapshots: int
    bytes: int
    packs: int
    prefix_records: int
    requests: int
    seconds: float


class FetchResponse(Reply):
    """What ``pf fetch --json`` prints: ``refs`` maps each remote ref to its cid."""

    url: str
    refs: dict[str, str]
    snapshots: int
    blobs: int
    pages: int
    bytes: int
    requests: int
    seconds: float


class PullResponse(Reply):
    """What ``pf pull --json`` prints."""

    fetch: FetchResponse
    refs: list[RefUpdate]


class EngineStatus(Reply):
    fingerprint: Fingerprint
    num_blocks: int
    page_bytes: int
    block_size: int
    max_model_len: int
    max_num_batched_tokens: int

    @field_serializer("fingerprint")
    def _fingerprint_as_recorded(self, fingerprint: Fingerprint) -> dict[str, Any]:
        # The fingerprint's own JSON, as snapshots record it: fields it leaves out when they
        # hold their default (kv_groups of a single full-attention group) stay out here too.
        return dict(sorted(fingerprint.to_json().items()))


class StatusResponse(Reply):
    store: StoreStatus
    engine: EngineStatus


class ErrorDetail(Reply):
    #: Stable, for programs (docs/http-api.md#errors lists them).
    type: str
    #: One line for people.
    message: str


class ErrorResponse(Reply):
    """The shape of every error of every route (``ApiError.body()``)."""

    error: ErrorDetail
