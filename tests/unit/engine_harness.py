"""vLLM's real scheduler and both roles of our connector in one process, with no model.

The connector's logic lives between vLLM's scheduler (which blocks a request owns, when it is
preempted, which output it discards) and the worker (which bytes those blocks hold). Testing it
through a live server takes minutes per case; here the same classes meet in one process and a
step takes milliseconds:

- the scheduler is vLLM's own ``Scheduler`` on a small ``KVCacheConfig``, configured with our
  connector by module path exactly as ``pf serve`` configures it, so it builds the SCHEDULER role
  itself;
- the WORKER role is our connector built by hand over real CPU-layout KV tensors;
- a fake forward pass writes, into each computed token's slot, numbers that depend on every
  token up to that position (as real KV does), so a restored block can be compared with the
  block the engine would have computed;
- ``step()`` runs the worker hooks in the order vLLM's model runner runs them and feeds the
  outcome (sampled tokens, invalid block ids) back through ``Scheduler.update_from_output``.

``InProcessEngine`` puts the same loop behind the small part of vLLM's ``EngineClient`` that
``Control`` uses, so the control plane runs against it unchanged.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from processfork.plugin.tp_ranks import RankHeads

BLOCK = 16
LAYERS = 2
KV_HEADS = 2
HEAD_DIM = 16
EOS = 2
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]

# A Llama small enough to exist only as a config: nothing here loads weights or a tokenizer.
_MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": KV_HEADS * 2 * HEAD_DIM,
    "intermediate_size": 128,
    "num_attention_heads": KV_HEADS * 2,
    "num_key_value_heads": KV_HEADS,
    "num_hidden_layers": LAYERS,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": EOS,
}


def make_vllm_config(model_dir: Path) -> Any:
    """A VllmConfig with our connector, as ``pf serve`` configures it (several seconds: build once)."""
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(_MODEL_CONFIG))
    model = ModelConfig(
        model=str(model_dir), dtype="float32", seed=0, skip_tokenizer_init=True, max_model_len=2048
    )
    return VllmConfig(
        model_config=model,
        scheduler_config=SchedulerConfig(
            max_num_seqs=16, max_num_batched_tokens=256, max_model_len=2048,
            enable_chunked_prefill=True, is_encoder_decoder=False,
        ),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
        kv_transfer_config=KVTransferConfig(
            kv_connector="ProcessForkConnector",
            kv_connector_module_path="processfork.plugin.connector",
            kv_role="kv_both",
            kv_connector_extra_config={},
            kv_load_failure_policy="recompute",
        ),
        device_config=DeviceConfig("cpu"),
    )


# --- the fake forward pass ------------------------------------------------------------------------
def slot_value(prefix_hash: int, layer: int, kv: int) -> torch.Tensor:
    """What the fake model writes for one token: [heads, head_dim], unique per prefix and layer.

    Exact in float32 (below 2**24), so restored bytes compare equal, not just close.
    """
    base = (prefix_hash % 4096) * 4096 + (layer * 2 + kv) * KV_HEADS * HEAD_DIM
    return torch.arange(base, base + KV_HEADS * HEAD_DIM, dtype=torch.float32).view(
        KV_HEADS, HEAD_DIM
    )


def prefix_hashes(tokens: list[int]) -> list[int]:
    """One number per position that depends on every token up to it, as a token's KV does."""
    out, h = [], 17
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % 1_000_000_007
        out.append(h)
    return out


class FakeKVCache:
    """Per-layer KV tensors in vLLM's CPU attention layout, and a forward pass that fills them.

    The CPU backend stores each (block, head) row as K then V; with the ``vec`` ISA, K is
    ``[head_dim, block_size]`` and V ``[block_size, head_dim]``.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        # One buffer for every layer, evenly spaced, as vLLM's CPU backend allocates it.
        self.buffer = torch.zeros(LAYERS, num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM)
        self.layers = {name: self.buffer[i] for i, name in enumerate(LAYER_NAMES)}

    def _k(self, layer: int, block: int) -> torch.Tensor:  # [heads, head_dim, block_size]
        return self.buffer[layer, block].view(KV_HEADS, 2, BLOCK * HEAD_DIM)[:, 0].view(
            KV_HEADS, HEAD_DIM, BLOCK
        )

    def _v(self, layer: int, block: int) -> torch.Tensor:  # [heads, block_size, head_dim]
        return self.buffer[layer, block].view(KV_HEADS, 2, BLOCK * HEAD_DIM)[:, 1].view(
            KV_HEADS, BLOCK, HEAD_DIM
        )

    def write(self, layer: int, block_ids: list[int], tokens: list[int], start: int, end: int):
        """Compute positions ``start .. end - 1`` of a sequence into its blocks, one layer."""
        hashes = prefix_hashes(tokens[:end])
        for pos in range(start, end):
            block, slot = block_ids[pos // BLOCK], pos % BLOCK
            self._k(layer, block)[:, :, slot] = slot_value(hashes[pos], layer, 0)
            self._v(layer, block)[:, slot, :] = slot_value(hashes[pos], layer, 1)

    def holds(self, block: int, tokens: list[int], index: int) -> bool:
        """Whether engine block ``block`` holds block ``index`` of ``tokens`` as computed."""
        hashes = prefix_hashes(tokens[: (index + 1) * BLOCK])
        for layer in range(LAYERS):
            for slot in range(BLOCK):
                h = hashes[index * BLOCK + slot]
                if not torch.equal(self._k(layer, block)[:, :, slot], slot_value(h, layer, 0)):
                    return False
                if not torch.equal(self._v(layer, block)[:, slot, :], slot_value(h, layer, 1)):
                    return False
        return True

    def scribble(self, block: int) -> None:
        """Leave garbage in a block, as a previous owner would."""
        self.buffer[:, block].fill_(-7.0)


class _CpuAttnBackend:
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"


# --- the engine -----------------------------------------------------------------------------------
@dataclass
class Finished:
    """What the engine reported for a finished request."""

    request_id: str
    finish_reason: Any
    kv_transfer_params: dict[str, Any] | None
    output_token_ids: list[int] = field(default_factory=list)


@dataclass
class StepRecord:
    """What happened in one engine step, for assertions."""

    scheduled: dict[str, int]
    invalid_block_ids: set[int]
    plan: Any
    #: the block table of every scheduled request, as the step ran
    tables: dict[str, list[int]]


class Engine:
    """vLLM's scheduler, our connector's two roles and a fake forward pass, stepped by hand."""

    def __init__(
        self,
        vllm_config: Any,
        store_path: Path,
        *,
        num_blocks: int = 64,
        max_num_batched_tokens: int = 256,
        worker_extra: dict[str, Any] | None = None,
        tp_size: int = 1,
    ):
        """``tp_size`` > 1: the engine poses as that many tensor-parallel ranks of a model of
        ``KV_HEADS * tp_size`` KV heads, each rank a worker of its own over the same tensors
        (so every rank's heads hold the bytes the fake forward pass writes)."""
        from processfork.plugin.connector import ProcessForkConnector
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        cfg = vllm_config
        # The session shares one config (it takes seconds to build); every engine sets all of
        # what it varies, so nothing leaks from one test to the next.
        cfg.kv_transfer_config.kv_connector_extra_config = {
            "store": str(store_path), **(worker_extra or {})
        }
        cfg.scheduler_config.max_num_batched_tokens = max_num_batched_tokens
        cfg.cache_config.num_gpu_blocks = num_blocks
        cfg.compilation_config.static_forward_context.update(
            {n: SimpleNamespace(attn_backend=_CpuAttnBackend, isa="vec") for n in LAYER_NAMES}
        )
        self.vllm_config = cfg
        self.store_path = store_path
        kv_cache_config = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[
                KVCacheGroupSpec(
                    list(LAYER_NAMES),
                    FullAttentionSpec(
                        block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM,
                        dtype=torch.float32,
                    ),
                )
            ],
        )
        self.scheduler = Scheduler(
            vllm_config=cfg,
            kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(cfg),
            block_size=BLOCK,
            log_stats=True,
        )
        self.connector = self.scheduler.connector
        assert isinstance(self.connector, ProcessForkConnector)
        self.kv = FakeKVCache(num_blocks)
        self.workers = [ProcessForkConnector(cfg, KVConnectorRole.WORKER, kv_cache_config)
                        for _ in range(tp_size)]
        for rank, worker in enumerate(self.workers):
            worker.register_kv_caches(self.kv.layers)
            if tp_size > 1:
                worker._worker.rank_heads = RankHeads(KV_HEADS * tp_size, tp_size, rank)
        self.worker = self.workers[0]
        if tp_size > 1:
            _record_tp(store_path, cfg.kv_transfer_config.engine_id, tp_size)
        init_none_hash(sha256)
        self._hasher = get_request_block_hasher(BLOCK, sha256)
        self.auth: str = cfg.kv_transfer_config.engine_id
        self.finished: dict[str, Finished] = {}
        #: every request added, by id (vLLM's Request objects)
        self.added: dict[str, Any] = {}
        self._sampled: dict[str, list[int]] = {}
        self.steps: list[StepRecord] = []
        #: each request's block table as its last step ran (its blocks keep their bytes after
        #: it finishes, until another request takes them)
        self.tables: dict[str, list[int]] = {}
        #: the connector's stats of each step that had any (what vLLM sends to /metrics)
        self.kv_stats: list[dict[str, Any]] = []
        #: called between the loads and the forward pass of each step (to damage a page, say)
        self.before_forward: Callable[[Any], None] | None = None

    # -- requests ----------------------------------------------------------------------------------
    def request(
        self,
        tokens: list[int],
        *,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
        max_tokens: int = 1,
        cache_salt: str | None = None,
        client_params: dict[str, Any] | None = None,
    ) -> Any:
        """A vLLM ``Request`` as EngineCore builds it; ``params`` is our instruction, if any."""
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        extra = None
        if params is not None:
            extra = {"kv_transfer_params": {"processfork": {**params, "auth": self.auth}}}
        elif client_params is not None:  # what an OpenAI client sends, as it sends it
            extra = {"kv_transfer_params": client_params}
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra)
        sampling.update_from_generation_config({}, EOS)
        return Request(
            request_id=request_id or f"req-{uuid.uuid4().hex[:8]}",
            prompt_token_ids=list(tokens),
            sampling_params=sampling,
            pooling_params=None,
            block_hasher=self._hasher,
            cache_salt=cache_salt,
        )

    def add(self, tokens: list[int], **kwargs: Any) -> str:
        request = self.request(tokens, **kwargs)
        self.added[request.request_id] = request
        self.scheduler.add_request(request)
        return request.request_id

    def preempt(self, request_id: str) -> None:
        """Preempt a running request as vLLM's scheduler does when it runs out of blocks."""
        import time

        request = self.scheduler.requests[request_id]
        self.scheduler.running.remove(request)
        self.scheduler._preempt_request(request, time.monotonic())

    def abort(self, request_id: str) -> None:
        from vllm.v1.request import RequestStatus

        for request in self.scheduler.finish_requests(request_id, RequestStatus.FINISHED_ABORTED):
            self.finished.setdefault(
                request.request_id, Finished(request.request_id, "abort", None)
            )

    # -- steps -------------------------------------------------------------------------------------
    def step(self) -> StepRecord:
        """One engine step: schedule, run the worker hooks around a fake forward, update."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        out = self.scheduler.schedule()
        # The worker hooks in the order of vLLM's KVConnectorModelRunnerMixin.
        workers = self.workers
        for worker in workers:
            worker.bind_connector_metadata(out.kv_connector_metadata)
            if out.has_sync_kv_loads:
                worker.start_load_kv(None)  # type: ignore[arg-type]
        if self.before_forward is not None:
            self.before_forward(out)
        for layer, name in enumerate(LAYER_NAMES):
            for worker in workers:
                worker.wait_for_layer_load(name)
            self._forward_layer(out, layer)
        invalid: set[int] = set()
        for worker in workers:
            if not out.has_sync_kv_loads:
                worker.start_load_kv(None)  # type: ignore[arg-type]
            worker.wait_for_save()
            # vLLM reports what the first rank reports of sending, and every rank's load errors.
            rank_transfers = worker.get_transfer_results(out.finished_req_ids)
            if worker is self.worker:
                transfers = rank_transfers
            invalid |= worker.get_block_ids_with_load_errors()
            worker.clear_connector_metadata()

        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            request = self.scheduler.requests[rid]
            # A step that does not reach the end of the prompt samples nothing.
            done = request.num_computed_tokens >= request.num_tokens
            sampled.append([EOS + 1] if done else [])
        runner_out = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=None,
            kv_connector_output=KVConnectorOutput(
                invalid_block_ids=set(invalid),
                finished_sending=transfers.finished_sending or None,
            ),
        )
        record = StepRecord(
            dict(out.num_scheduled_tokens), set(invalid), out.kv_connector_metadata,
            {rid: self.block_ids(rid) for rid in req_ids},
        )
        self.tables.update(record.tables)
        self.steps.append(record)
        for outputs in self.scheduler.update_from_output(out, runner_out).values():
            stats = outputs.scheduler_stats
            if stats is not None and stats.kv_connector_stats:
                self.kv_stats.append(dict(stats.kv_connector_stats))
            for o in outputs.outputs:
                self._sampled.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finish_reason is not None:
                    self.finished[o.request_id] = Finished(
                        o.request_id, o.finish_reason, o.kv_transfer_params,
                        self._sampled.pop(o.request_id),
                    )
        return record

    def _forward_layer(self, out: Any, layer: int) -> None:
        for rid, count in out.num_scheduled_tokens.items():
            request = self.scheduler.requests[rid]
            # num_computed_tokens already counts this step's tokens (vLLM advances it at
            # schedule time); the step computes the positions just before it.
            end = request.num_computed_tokens
            block_ids = self.block_ids(rid)
            self.kv.write(layer, block_ids, list(request.all_token_ids), end - count, end)

    def run(self, *request_ids: str, max_steps: int = 200) -> dict[str, Finished]:
        """Step until every named request finished (or, with none named, until idle)."""
        for _ in range(max_steps):
            if request_ids and all(r in self.finished for r in request_ids):
                break
            if not request_ids and not self.scheduler.has_requests():
                break
            self.step()
        else:
            raise AssertionError(f"requests did not finish in {max_steps} steps")
        return {r: self.finished[r] for r in request_ids}

    # -- inspection --------------------------------------------------------------------------------
    def block_ids(self, request_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(request_id)[0])

    @property
    def pool(self) -> Any:
        return self.scheduler.kv_cache_manager.block_pool

    def cached_prefix_blocks(self, tokens: list[int]) -> list[int]:
        """Block ids that vLLM's prefix cache would serve for ``tokens``, in order."""
        probe = self.request(tokens)
        found = []
        for block_hash in probe.block_hashes:
            cached = self.pool.get_cached_block(block_hash, [0])
            if cached is None:
                break
            found.append(cached[0].block_id)
        return found

    def forget_cache(self) -> None:
        """A cold engine, as after a restart: no prefix cache, garbage in every block, no
        steps on record."""
        assert self.pool.reset_prefix_cache(), "requests still hold blocks"
        self.kv.buffer.fill_(-7.0)
        self.steps.clear()
        staged = self.worker_side._staged
        if staged is not None:  # a restarted worker remembers no block's pages
            staged.forget(range(self.kv.num_blocks))

    def holds(self, request_id: str, tokens: list[int], blocks: int | None = None) -> bool:
        """Whether the request's first ``blocks`` blocks (default: every full one) hold
        ``tokens``' KV as the engine computes it."""
        ids = self.tables[request_id]
        count = len(tokens) // BLOCK if blocks is None else blocks
        return all(self.kv.holds(ids[i], tokens, i) for i in range(count))

    def assert_no_leaks(self) -> None:
        """Every request gone, every block back in the pool, no connector state left."""
        assert not self.scheduler.requests
        assert not self.scheduler.running and len(self.scheduler.waiting) == 0
        pool = self.pool
        assert all(b.ref_cnt == 0 for b in pool.blocks[1:]), [
            b.block_id for b in pool.blocks if b.ref_cnt
        ]
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
        side = self.side
        assert not side._snapshots and not side._checkouts and not side._live
        assert not side._pending_loads and not side._resident_saves

    @property
    def side(self) -> Any:
        """The connector's scheduler side (SchedulerSide)."""
        return self.connector._scheduler

    @property
    def worker_side(self) -> Any:
        """The connector's worker side (WorkerSide)."""
        return self.worker._worker

    def close(self) -> None:
        for worker in self.workers:
            worker.shutdown()


def _record_tp(store_path: Path, engine_id: str, tp_size: int) -> None:
    """The engine's record as a TP-``tp_size`` engine's workers write it: its TP size and the
    model's KV heads, not one rank's share."""
    from processfork.plugin.jobs import EngineRecord, engine_meta_key
    from processfork.store import Store

    with Store(str(store_path)) as store:
        record = EngineRecord.from_json(store.meta_get(engine_meta_key(engine_id)))
        fingerprint = replace(record.fingerprint, tp_size=tp_size,
                              num_kv_heads=KV_HEADS * tp_size)
        store.meta_put(engine_meta_key(engine_id), replace(record, fingerprint=fingerprint)
                       .to_json())


# --- the part of vLLM's EngineClient that Control uses ----------------------------------------
class InProcessEngine:
    """``generate`` / ``abort`` over an ``Engine``, stepping it while any request is waited on."""

    def __init__(self, engine: Engine, *, late_aborts: bool = False):
        self.engine = engine
        self.vllm_config = engine.vllm_config
        self.aborted: list[str] = []
        #: aborts arrive only after the request finished on its own (the race the API server
        #: loses when the engine's last step is already under way)
        self.late_aborts = late_aborts

    async def generate(
        self, prompt: Any, sampling: Any, request_id: str
    ) -> AsyncIterator[SimpleNamespace]:
        from vllm.v1.request import Request

        engine = self.engine
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt["prompt_token_ids"]),
            sampling_params=sampling,
            pooling_params=None,
            block_hasher=engine._hasher,
        )
        if len(request.prompt_token_ids) >= engine.vllm_config.model_config.max_model_len:
            raise ValueError("prompt too long")
        engine.added[request_id] = request
        engine.scheduler.add_request(request)
        while request_id not in engine.finished:
            if engine.scheduler.has_requests():
                engine.step()
            # Let the other coroutines (other sequences, the control plane's polling) run.
            await asyncio.sleep(0.001)
        done = engine.finished[request_id]
        yield SimpleNamespace(finished=True, kv_transfer_params=done.kv_transfer_params)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if not self.late_aborts:
            self.engine.abort(request_id)

    def get_tokenizer(self) -> Any:
        raise AssertionError("the tests pass token ids")


# --- the control plane over the engine ------------------------------------------------------------
def control_for(engine: Engine, **options: Any) -> Any:
    """``Control`` (the API server's side) driving ``engine``, on the same store."""
    from processfork.plugin.control import Control

    return Control(InProcessEngine(engine, **options), str(engine.store_path), engine.auth)


def snapshot_reply(engine: Engine, name: str, token_ids: list[int], **body: Any) -> Any:
    """Snapshot one sequence through the control plane; the route's whole response."""
    from processfork.plugin.api_models import SnapshotBody

    control = control_for(engine)
    try:
        return asyncio.run(control.snapshot(SnapshotBody(name=name, token_ids=token_ids, **body)))
    finally:
        control.close()


def restore_by_checkout(engine: Engine, seq: list[int], cid: str, *, loaded: int) -> None:
    """A checkout request of ``cid`` (job ``c``) loads ``loaded`` tokens with no failed block,
    computes the rest, and leaves its blocks holding what the engine computes for ``seq``."""
    rid = engine.add(seq, params={"op": "checkout", "job": "c", "cid": cid, "seq": 0})
    first = engine.step()
    assert first.scheduled[rid] == len(seq) - loaded and first.invalid_block_ids == set()
    engine.run(rid)
    assert engine.holds(rid, seq)


def take_snapshot(engine: Engine, name: str, token_ids: list[int], **body: Any) -> str:
    """Snapshot one sequence through the control plane; its cid."""
    return snapshot_reply(engine, name, token_ids, **body).cid


def page_digests(store: Any, cid: str, seq: int = 0) -> list[tuple[str, str]]:
    return list(store.get_snapshot(cid).sequences[seq].pages)


def damage_page(store: Any, digest: str) -> None:
    """Overwrite one stored page behind the store's back, as a bad disk would."""
    key = bytes.fromhex(digest)

    def run(txn: Any) -> None:
        db = store.dbs["pages"]
        txn.put(key, b"\x5a" * len(txn.get(key, db=db)), db=db)

    store.env.write(run)


def delete_page(store: Any, digest: str) -> None:
    """Remove one stored page, as a gc bug or a lost write would."""
    key = bytes.fromhex(digest)
    store.env.write(lambda txn: txn.delete(key, db=store.dbs["pages"]))


def tokens(n: int, seed: int = 0) -> list[int]:
    """``n`` token ids, different for each seed (and never EOS)."""
    return [3 + (seed * 7919 + i * 31) % 1000 for i in range(n)]


def blocks_of(n_tokens: int) -> int:
    return -(-n_tokens // BLOCK)


def ids(values: Iterable[Any]) -> list[int]:
    return [v.block_id for v in values]


#: The worker's three page paths, as connector extra config: every path must store and load the
#: same pages.
PAGE_PATHS = {
    "pipelined": {},
    "direct": {"pipelined_loads": False},
    "staged": {"page_path": "staged"},
}
