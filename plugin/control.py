"""The control plane: snapshot, checkout and fork, driven from the API server process.

The API server never touches KV bytes.  It talks to the engine the way every
OpenAI route does, by submitting ordinary requests (``max_tokens=1``) whose
``kv_transfer_params`` tell our connector what to do; the scheduler then treats
them like any other traffic.  Pages land in the store from the worker; this
module reads the job records back and commits the manifest and ref atomically.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from processfork.store import Manifest, SnapshotSequence, Store, StoreError, documents
from processfork.store.manifest import FORMAT_HEADS, PageGroup
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.sampling_params import SamplingParams

from .api_errors import ApiError, from_store_error
from .api_models import (
    CheckoutBody,
    CheckoutResponse,
    ForkBody,
    ForkResponse,
    SnapshotBody,
    SnapshotResponse,
)
from .connector_config import ConnectorConfig
from .fingerprint import loads_at_any_tp
from .jobs import (
    CaptureOp,
    CaptureReply,
    CheckoutOp,
    CheckoutReply,
    EngineRecord,
    JobErrorKind,
    JobRecord,
    Op,
    SnapshotOp,
    engine_meta_key,
    job_meta_key,
    params_for,
)
from .kv_groups import GroupLayout, group_job, manifest_format
from .tp_ranks import gather_ranks, rank_job_meta_key
from .trace import mark

__all__ = ["Control", "Ranks", "elapsed_ms"]


@dataclass
class _SeqOutcome:
    pages: list[tuple[str, str]]
    new_blocks: int
    bytes_written: int
    groups: list[PageGroup] | None = None  # several KV-cache groups: their blocks in `pages`
    reused_blocks: int = 0  # named by the engine from memory, not copied out


@dataclass(frozen=True)
class Ranks:
    """The tensor-parallel ranks whose records make one save job, and the model's KV heads
    (None at TP size 1: whole-block pages, one record under the job's key)."""

    tp_size: int = 1
    heads: int | None = None

    @classmethod
    def of(cls, record: EngineRecord) -> Ranks:
        fp = record.fingerprint
        return cls(fp.tp_size, fp.num_kv_heads) if fp.tp_size > 1 else cls()

    @property
    def pairs_per_block(self) -> int:
        return 1 if self.heads is None else self.heads

    def keys(self, job: str) -> list[str]:
        """Where each rank records its part of ``job`` (plugin/tp_ranks.py)."""
        return [rank_job_meta_key(job, r) for r in range(self.tp_size)]


class Control:
    """Snapshot / checkout / fork against one engine and one store."""

    def __init__(self, engine_client: Any, store_path: str, engine_id: str):
        self.engine = engine_client
        self.store_path = store_path
        self.engine_id = engine_id
        vllm_config = engine_client.vllm_config
        self.block_size: int = vllm_config.cache_config.block_size
        self.max_model_len: int = vllm_config.model_config.max_model_len
        self.max_num_batched_tokens: int = vllm_config.scheduler_config.max_num_batched_tokens
        self._store: Store | None = None
        self._engine_record: EngineRecord | None = None
        kv_config = getattr(vllm_config, "kv_transfer_config", None)
        extra = getattr(kv_config, "kv_connector_extra_config", None) or {}
        #: `pf serve --remote`: where a checkout finds snapshots this store lacks.
        self.remote_url: str | None = ConnectorConfig.from_extra(extra).remote

    # --- plumbing ---------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.store_path)
        return self._store

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking store call off the event loop, mapping store errors to HTTP."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except StoreError as exc:
            raise from_store_error(exc) from exc

    async def engine_record(self) -> EngineRecord:
        """What the worker published when it registered its KV tensors."""
        if self._engine_record is None:
            record = await self._run(self.store.meta_get, engine_meta_key(self.engine_id))
            if not record:
                raise ApiError(
                    503, "engine_not_ready", "the engine has not published its KV layout yet"
                )
            self._engine_record = EngineRecord.from_json(record)
        return self._engine_record

    async def _generate_one(
        self, tokens: list[int], op: Op, tag: str, request_id: str | None = None
    ) -> dict[str, Any] | None:
        """Submit one internal request and wait for it; its ``kv_transfer_params`` at the end."""
        sampling = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            extra_args={"kv_transfer_params": params_for(op, self.engine_id)},
        )
        request_id = request_id or f"pf-{tag}-{uuid.uuid4().hex[:12]}"
        final = None
        try:
            async for output in self.engine.generate(
                TokensPrompt(prompt_token_ids=tokens), sampling, request_id
            ):
                final = output
        except (ValueError, VLLMValidationError) as exc:  # input validation (ids, length)
            raise ApiError(400, "invalid_request", str(exc)) from exc
        if final is None or not final.finished:
            raise ApiError(503, "engine_unavailable", "the engine did not finish the request")
        return final.kv_transfer_params

    def _check_length(self, tokens: list[int]) -> None:
        if len(tokens) >= self.max_model_len:
            raise ApiError(
                413,
                "sequence_too_long",
                f"sequence of {len(tokens)} tokens does not fit max-model-len {self.max_model_len} "
                "(one position is needed to run it)",
            )

    # --- what to capture ----------------------------------------------------------
    async def _sequences_for(self, body: SnapshotBody) -> list[list[int]]:
        if body.token_ids is not None:
            return [list(body.token_ids)]
        if body.prompt is not None:
            tokenizer = self.engine.get_tokenizer()
            return [list(tokenizer.encode(body.prompt))]
        if body.messages is not None:
            tokenizer = self.engine.get_tokenizer()
            try:
                # Reached only where vLLM has no render route (plugin/chat_render.py): the
                # model's own template, without the server's --chat-template.
                text = tokenizer.apply_chat_template(
                    body.messages, tokenize=False, tools=body.tools,
                    add_generation_prompt=(
                        True if body.add_generation_prompt is None else body.add_generation_prompt
                    ),
                    **(body.chat_template_kwargs or {}),
                )
            except Exception as exc:  # template errors are the client's messages
                raise ApiError(400, "invalid_request", f"cannot apply chat template: {exc}") from exc
            return [list(tokenizer.encode(text, add_special_tokens=False))]
        params = await self._generate_one([0], CaptureOp(body.request_id), "capture")
        seqs = CaptureReply.from_params(params).sequences
        if body.request_id is not None and not seqs:
            raise ApiError(
                404, "not_found", f"no request {body.request_id!r} is resident in the engine"
            )
        if not seqs:
            raise ApiError(409, "nothing_resident", "the engine holds no sequences to snapshot")
        return seqs

    # --- snapshot -----------------------------------------------------------------
    async def snapshot(self, body: SnapshotBody) -> SnapshotResponse:
        t0, began = time.perf_counter(), time.time()
        record = await self.engine_record()
        ranks = Ranks.of(record)
        seqs = await self._sequences_for(body)
        for tokens in seqs:
            self._check_length(tokens)
        old_ref = await self._run(self.store.get_ref, body.name)
        parent_cid = (
            await self._run(self.store.resolve, body.parent) if body.parent else old_ref
        )
        parent_seqs: list[tuple[list[int], list[tuple[str, str]]]] = []
        # Several KV-cache groups: every group saves its own blocks (identical pages are not
        # written again), so nothing is taken from the parent's page lists.
        layout = (GroupLayout.from_fingerprint(record.fingerprint.kv_groups)
                  if record.fingerprint.kv_groups is not None else None)
        if parent_cid and layout is None:
            parent = await self._run(self.store.get_snapshot, parent_cid)
            # Pages are reused only as they are: whole-block pages, or pages of one KV head.
            if (record.fingerprint.first_mismatch(parent.fingerprint) is None
                    and (parent.format == FORMAT_HEADS) == (ranks.heads is not None)):
                for seq in parent.sequences:
                    toks = await self._run(self.store.get_tokens, seq.tokens)
                    parent_seqs.append((list(toks), list(seq.pages)))
        jobs = [uuid.uuid4().hex for _ in seqs]
        for job, tokens in zip(jobs, seqs):
            mark("snap.begin", job, began, tokens=len(tokens))
        # Each group's pages are saved under a job of its own; group 0's is the sequence's job.
        group_jobs = [group_job(j, g) for j in jobs
                      for g in range(len(layout.groups) if layout is not None else 1)]
        # The token blobs are written while the engine runs: their durable commit overlaps the
        # engine's work instead of following it. Each has its own pin until the snapshot commits.
        token_pins = [_tokens_pin(job) for job in jobs]
        token_refs = asyncio.gather(
            *(self._run(self.store.put_tokens, t, pin=p) for t, p in zip(seqs, token_pins))
        )
        try:
            outcomes = await asyncio.gather(
                *(self._snapshot_sequence(job, t, parent_seqs, layout, ranks)
                  for job, t in zip(jobs, seqs))
            )
            refs = await token_refs
            for job in jobs:
                mark("snap.commit", job)
            sequences = [SnapshotSequence(tokens=r, pages=o.pages, groups=o.groups,
                                          heads=ranks.heads)
                         for r, o in zip(refs, outcomes)]
            manifest = Manifest(
                format=FORMAT_HEADS if ranks.heads is not None else manifest_format(layout),
                name=body.name,
                parents=[parent_cid] if parent_cid else [],
                fingerprint=record.fingerprint.to_json(),
                sequences=sequences,
            )
            cid = await self._run(
                self.store.write_snapshot,
                manifest,
                ref=body.name,
                expected_old=old_ref,
                move_head=True,
                # The reflog shows the action ("snapshot") before the message: do not repeat it.
                message=body.message or (
                    f"{len(seqs)} sequence{'s' if len(seqs) != 1 else ''}, "
                    f"{sum(len(t) for t in seqs)} tokens"
                ),
                drop_pins=[*group_jobs, *token_pins],
                drop_meta=[k for job in group_jobs for k in ranks.keys(job)],
            )
        except BaseException:
            await asyncio.gather(token_refs, return_exceptions=True)
            await self._run(self._forget_jobs, jobs, group_jobs, ranks)
            raise
        for job in jobs:
            mark("snap.end", job)
        return SnapshotResponse(
            cid=cid,
            name=body.name,
            parents=manifest.parents,
            num_sequences=len(sequences),
            num_tokens=manifest.num_tokens,
            num_pages=sum(s.num_blocks for s in sequences),
            new_pages=sum(o.new_blocks for o in outcomes),
            bytes_written=sum(o.bytes_written for o in outcomes),
            reused_pages=sum(o.reused_blocks for o in outcomes),
            ms=elapsed_ms(t0),
        )

    def _forget_jobs(self, jobs: list[str], group_jobs: list[str],
                     ranks: Ranks | None = None) -> None:
        """After a failed snapshot: drop the workers' job records and the pins, so gc may
        reclaim what was written. (A committed snapshot drops them in its own transaction.)"""
        for job in group_jobs:
            for key in (ranks or Ranks()).keys(job):
                self.store.meta_delete(key)
            self.store.drop_pin(job)
        for job in jobs:
            self.store.drop_pin(_tokens_pin(job))

    async def _snapshot_sequence(
        self,
        job: str,
        tokens: list[int],
        parent_seqs: list[tuple[list[int], list[tuple[str, str]]]],
        layout: GroupLayout | None = None,
        ranks: Ranks | None = None,
    ) -> _SeqOutcome:
        """Run one sequence through the engine with a snapshot job; collect its pages."""
        bs = self.block_size
        ranks = ranks or Ranks()
        per = ranks.pairs_per_block
        reuse: list[tuple[str, str]] = []
        for ptoks, ppages in parent_seqs:
            common = _common_prefix(ptoks, tokens)
            blocks = min(common // bs, len(ppages) // per)
            if blocks * per > len(reuse):
                reuse = ppages[: blocks * per]
        # vLLM computes at least one token of every request and reuses only whole blocks from its
        # prefix cache, so a resident sequence that ends on a block boundary would have its whole
        # last block recomputed (a block of queries over the entire context). One extra token
        # after it lets every block of the sequence come from the cache; the saved range stops
        # before that token, and causal attention keeps the sequence's KV independent of it.
        # Not with several KV-cache groups: a sliding-window group stores the window of the split
        # point a checkout resumes from (before the last token), and a prefix-cache hit that
        # reached past it would have freed the window's first blocks already.
        prompt = tokens
        if layout is None and len(tokens) % bs == 0 and len(tokens) + 1 < self.max_model_len:
            prompt = [*tokens, tokens[-1]]
        request_id = f"pf-snapshot-{uuid.uuid4().hex[:12]}"
        mark("snap.submit", job)
        run = asyncio.ensure_future(self._generate_one(
            prompt,
            SnapshotOp(job, skip_blocks=len(reuse) // per, num_tokens=len(tokens)),
            "snapshot",
            request_id,
        ))
        try:
            # Several KV-cache groups: the worker saves them in group order, so the last group's
            # record settles last; reading the others before it could miss theirs.
            watched = job if layout is None else group_job(job, len(layout.groups) - 1)
            await self._end_when_saved(watched, run, request_id, ranks)
            mark("snap.saved", job)
        except BaseException:
            run.cancel()
            raise
        await run
        mark("snap.ended", job)
        if layout is not None:
            return await self._group_outcome(job, tokens, layout, ranks)
        record = await self._saved(job, ranks)
        # The worker's final record lists the saved pages in block order (a pin is a set).
        pages = reuse + record.pages
        expected = -(-len(tokens) // bs)
        if len(pages) != expected * per:
            raise ApiError(
                500, "snapshot_failed", f"engine saved {len(pages) // per} of {expected} blocks"
            )
        return _SeqOutcome(pages, record.new_blocks, record.bytes_written,
                           reused_blocks=record.reused_blocks)

    async def _saved(self, job: str, ranks: Ranks | None = None) -> JobRecord:
        """A save job's final record; 507 or 500 when it failed or left none."""
        record = await self._job_record(job, ranks)
        if record is None or not record.succeeded:
            err = record.error if record is not None else None
            if err is not None and err.kind is JobErrorKind.STORE_FULL:
                raise ApiError(507, "store_full", err.message)
            detail = f": {err.message}" if err is not None else ""
            raise ApiError(500, "snapshot_failed", f"the engine did not save the sequence{detail}")
        return record

    async def _group_outcome(self, job: str, tokens: list[int], layout: GroupLayout,
                             ranks: Ranks | None = None) -> _SeqOutcome:
        """Each KV-cache group's saved pages, one group after the other, with the blocks each
        group stores (plugin/kv_groups.py)."""
        pages: list[tuple[str, str]] = []
        groups: list[PageGroup] = []
        new_blocks = bytes_written = 0
        ranges = layout.stored_ranges(len(tokens), self.block_size)
        for g, (first, end) in enumerate(ranges):
            record = await self._saved(group_job(job, g), ranks)
            per = ranks.pairs_per_block if ranks is not None else 1
            if len(record.pages) != (end - first) * per:
                raise ApiError(500, "snapshot_failed",
                               f"engine saved {len(record.pages) // per} of {end - first} "
                               f"blocks of KV-cache group {g}")
            pages += record.pages
            groups.append(PageGroup(first, end - first, layout.groups[g].is_state))
            new_blocks += record.new_blocks
            bytes_written += record.bytes_written
        return _SeqOutcome(pages, new_blocks, bytes_written, groups)

    async def _job_record(self, job: str, ranks: Ranks | None = None) -> JobRecord | None:
        """A job's record; a save of a tensor-parallel engine's ranks gathered into one."""
        if ranks is None or ranks.heads is None:
            raw = await self._run(self.store.meta_get, job_meta_key(job))
            return None if raw is None else JobRecord.from_json(raw)
        raws = await self._run(lambda: [self.store.meta_get(k) for k in ranks.keys(job)])
        return gather_ranks([None if r is None else JobRecord.from_json(r) for r in raws],
                            ranks.heads)

    async def _end_when_saved(self, job: str, run: asyncio.Future, request_id: str,
                              ranks: Ranks | None = None) -> None:
        """Return when the snapshot request ends, ending it as soon as its save is recorded.

        When the prefix cache holds every block to save, the worker saves them without a
        forward pass and the engine keeps the request waiting (see SchedulerSide): the worker's
        record is then the signal, and aborting the request is how it ends.
        """
        started = time.monotonic()
        while True:
            # Poll often at first (a save without a forward pass takes milliseconds), then
            # back off: a snapshot that computes its sequence may run for minutes.
            delay = 0.001 if time.monotonic() - started < 0.2 else 0.02
            done, _ = await asyncio.wait({run}, timeout=delay)
            if done:
                return
            record = await self._job_record(job, ranks)
            if record is not None and record.settled:
                await self.engine.abort(request_id)
                return

    async def require_compatible(self, cid: str, manifest: Manifest) -> EngineRecord:
        """This engine's record, if it can load `manifest`'s pages; else 409 naming the first
        fingerprint field that differs."""
        record = await self.engine_record()
        # Pages of one KV head, and a TP-1 engine's whole-block pages, load at any TP size whose
        # engine holds the same bytes per head.
        mismatch = record.fingerprint.first_mismatch(
            manifest.fingerprint, any_tp=loads_at_any_tp(manifest.format, manifest.fingerprint))
        if mismatch is not None:
            field = mismatch.field
            raise ApiError(
                409,
                "incompatible_snapshot",
                f"snapshot {cid[:19]} was taken with {field}={mismatch.stored!r} but this engine "
                f"has {field}={mismatch.engine!r}",
            )
        return record

    # --- checkout -----------------------------------------------------------------
    async def checkout(self, body: CheckoutBody) -> CheckoutResponse:
        t0, began = time.perf_counter(), time.time()
        cid = await self._resolve_or_fetch(body.cid)
        manifest = await self._run(self.store.get_snapshot, cid)
        await self.require_compatible(cid, manifest)
        token_lists = []
        for i, seq in enumerate(manifest.sequences):
            tokens = list(await self._run(self.store.get_tokens, seq.tokens))
            self._check_length(tokens)
            self._check_paged(cid, i, seq, len(tokens))
            token_lists.append(tokens)
        # HEAD moves while the engine loads (its durable commit costs as much as a small load);
        # a failed load moves it back.
        head_before = await self._run(self.store.head)
        # Like `git checkout BRANCH`: checking out by ref name makes HEAD point to the ref.
        target = body.cid if await self._run(self.store.get_ref, body.cid) == cid else cid
        moving = asyncio.ensure_future(self._run(self.store.checkout_head, target))
        try:
            replies = await asyncio.gather(
                *(self._checkout_sequence(cid, i, t, began) for i, t in enumerate(token_lists))
            )
        except BaseException:
            await asyncio.gather(moving, return_exceptions=True)
            previous = head_before.ref or head_before.cid
            if previous is not None:
                await self._run(self.store.checkout_head, previous)
            raise
        await moving
        loaded = sum(r.loaded_tokens for r in replies)
        return CheckoutResponse(
            ok=True,
            cid=cid,
            name=manifest.name,
            num_sequences=len(token_lists),
            num_tokens=manifest.num_tokens,
            pages_loaded=loaded // self.block_size,
            tokens_loaded=loaded,
            tokens_already_resident=sum(r.local_tokens for r in replies),
            ms=elapsed_ms(t0),
        )

    def _check_paged(self, cid: str, index: int, seq: SnapshotSequence, count: int) -> None:
        """A checkout loads the whole blocks before the last token; refuse, before any page
        moves, a sequence whose pages stop short of them. A session turn's partial last block
        has no page, and is never one of them; only a manifest that breaks that rule gets here."""
        needed = (count - 1) // self.block_size
        stored = -(-seq.tokens_with_pages // self.block_size)
        if needed > stored:
            raise ApiError(409, "pages_not_stored",
                           f"sequence {index} of snapshot {cid[:19]} has pages for its first "
                           f"{stored} blocks, but a checkout of its {count} tokens loads {needed}")
        if needed and any(g.state and not g.count for g in seq.groups or ()):
            # A session turn whose state the engine never held on its own stores none: its
            # attention blocks without the state at the split point would resume wrongly.
            raise ApiError(409, "pages_not_stored",
                           f"sequence {index} of snapshot {cid[:19]} stores no state at its "
                           f"split point ({needed * self.block_size} tokens)")

    async def _resolve_or_fetch(self, rev: str) -> str:
        """The cid `rev` names. With a remote (`pf serve --remote`), a full cid or a ref the
        store lacks is fetched from it first: the snapshot's fingerprint is checked against this
        engine's before any page moves, and every object is verified as it arrives."""
        try:
            return await self._run(self.store.resolve, rev)
        except ApiError as exc:
            if self.remote_url is None or exc.status != 404:
                raise
            missing = exc
        from processfork.store.remote.porcelain import fetch_revision

        record = await self.engine_record()

        def accept(manifests: dict[str, dict[str, Any]]) -> None:
            parents = {p for d in manifests.values() for p in d.get("parents") or []}
            for cid, d in manifests.items():
                stored = d.get("fingerprint") or {}
                mismatch = record.fingerprint.first_mismatch(
                    stored, any_tp=loads_at_any_tp(d.get("format"), stored))
                if cid not in parents and mismatch is not None:
                    raise ApiError(
                        409,
                        "incompatible_snapshot",
                        f"snapshot {cid[:19]} on {self.remote_url} was taken with "
                        f"{mismatch.field}={mismatch.stored!r} but this engine has "
                        f"{mismatch.field}={mismatch.engine!r}; nothing was fetched",
                    )

        cid = await self._run(fetch_revision, self.store, self.remote_url, rev, accept=accept)
        if cid is None:
            raise missing
        return cid

    async def _checkout_sequence(self, cid: str, index: int, tokens: list[int],
                                 began: float | None = None) -> CheckoutReply:
        job = uuid.uuid4().hex
        mark("api.begin", job, began, tokens=len(tokens))
        mark("api.submit", job)
        reply = CheckoutReply.from_params(
            await self._generate_one(tokens, CheckoutOp(job, cid, index), "checkout")
        )
        mark("api.reply", job)
        # The worker records a load only when it fails. Read it even when the reply counts
        # nothing loaded: a request preempted and admitted again may have loaded then.
        record = await self._job_record(job)
        if record is not None:
            await self._run(self.store.meta_delete, job_meta_key(job))
            if record.error is not None:
                raise ApiError(
                    500,
                    "integrity_error",
                    f"loading sequence {index} of {cid[:19]} failed ({record.error.message}); "
                    "the engine recomputed it instead",
                )
        mark("api.end", job)
        return reply

    # --- store operations -----------------------------------------------------------
    async def fork(self, body: ForkBody) -> ForkResponse:
        children = await self._run(self.store.fork_named, body.cid, body.n, prefix=body.name)
        return ForkResponse.model_validate(documents.fork_doc(children))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def elapsed_ms(t0: float) -> float:
    """Milliseconds since `t0` (a `time.perf_counter()`), as the replies' `ms` shows them."""
    return round((time.perf_counter() - t0) * 1000, 3)


def _tokens_pin(job: str) -> str:
    return f"{job}.tokens"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

