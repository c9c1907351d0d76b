"""vLLM's AsyncScheduler (the CUDA default) stepped as EngineCore.step_with_batch_queue steps it:
step N+1 is scheduled (and its forward runs) before step N's output is processed.

The fake model samples a token that depends on the KV it reads: a token derived from the
sequence when every position it attends to holds the KV of that sequence, GARBAGE otherwise.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import torch
from engine_harness import (
    BLOCK,
    LAYER_NAMES,
    LAYERS,
    Engine,
    Finished,
    StepRecord,
    prefix_hashes,
    slot_value,
)

GARBAGE = 1010
PHANTOM = 0  # the input at a position the runner has no token for


def sample_for(seq: list[int]) -> int:
    return 3 + prefix_hashes(seq)[-1] % 1000


class FakeRunner:
    def __init__(self, engine: Engine):
        self.e = engine
        self.tokens: dict[str, list[int]] = {}  # the runner's own view: prompt + what it sampled
        self.prompt_len: dict[str, int] = {}

    def _inputs(self, rid: str, end: int) -> list[int]:
        toks = self.tokens[rid]
        return [toks[p] if p < len(toks) else PHANTOM for p in range(end)]

    def _valid(self, block_ids: list[int], inp: list[int]) -> bool:
        kv, hashes = self.e.kv, prefix_hashes(inp)
        for pos in range(len(inp)):
            b, s = block_ids[pos // BLOCK], pos % BLOCK
            for layer in range(LAYERS):
                if not torch.equal(kv._k(layer, b)[:, :, s], slot_value(hashes[pos], layer, 0)):
                    return False
                if not torch.equal(kv._v(layer, b)[:, s, :], slot_value(hashes[pos], layer, 1)):
                    return False
        return True

    def execute(self, out: Any) -> Any:
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        e, worker = self.e, self.e.worker
        for nr in out.scheduled_new_reqs:
            self.tokens[nr.req_id] = list(nr.prompt_token_ids)
            self.prompt_len[nr.req_id] = len(nr.prompt_token_ids)
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            # gpu_model_runner._update_states: output tokens the scheduler does not count
            # (a step's output discarded after a failed sync load) are dropped.
            keep = self.prompt_len[rid] + cached.num_output_tokens[i]
            del self.tokens[rid][keep:]
        worker.bind_connector_metadata(out.kv_connector_metadata)
        worker.start_load_kv(None)
        req_ids = list(out.num_scheduled_tokens)
        spans = {}
        for rid in req_ids:
            request = e.scheduler.requests[rid]
            end = request.num_computed_tokens  # advanced at schedule time
            spans[rid] = (end - out.num_scheduled_tokens[rid], end)
        for layer, name in enumerate(LAYER_NAMES):
            worker.wait_for_layer_load(name)
            for rid in req_ids:
                start, end = spans[rid]
                e.kv.write(layer, e.block_ids(rid), self._inputs(rid, end), start, end)
        worker.wait_for_save()
        finished_sending = finished_recving = None
        if hasattr(worker, "get_finished"):
            finished_sending, finished_recving = worker.get_finished(out.finished_req_ids)
        invalid = worker.get_block_ids_with_load_errors()
        worker.clear_connector_metadata()
        sampled = []
        for rid in req_ids:
            start, end = spans[rid]
            if end < len(self.tokens[rid]):
                sampled.append([])  # a prefill chunk samples nothing
                continue
            inp = self._inputs(rid, end)
            tok = sample_for(inp) if self._valid(e.block_ids(rid), inp) else GARBAGE
            self.tokens[rid] = inp + [tok]
            sampled.append([tok])
        record = StepRecord(dict(out.num_scheduled_tokens), set(invalid),
                            out.kv_connector_metadata, {rid: e.block_ids(rid) for rid in req_ids})
        e.tables.update(record.tables)
        e.steps.append(record)
        return ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={}, pooler_output=None,
            kv_connector_output=KVConnectorOutput(invalid_block_ids=set(invalid),
                                                  finished_sending=finished_sending or None,
                                                  finished_recving=finished_recving or None),
        )


def make_async(engine: Engine, *, async_scheduling: bool = True) -> Engine:
    """Swap the engine's scheduler for an AsyncScheduler (and its connector), as CUDA runs."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    cfg = engine.vllm_config
    old = engine.scheduler
    old.connector.shutdown()
    cfg.scheduler_config.async_scheduling = async_scheduling
    try:
        cls = AsyncScheduler if async_scheduling else Scheduler
        engine.scheduler = cls(vllm_config=cfg, kv_cache_config=old.kv_cache_config,
                               structured_output_manager=StructuredOutputManager(cfg),
                               block_size=BLOCK, log_stats=True)
    finally:
        cfg.scheduler_config.async_scheduling = False
    engine.connector = engine.scheduler.connector
    engine.runner = FakeRunner(engine)
    engine.queue = deque()
    engine.depth = 2 if async_scheduling else 1
    return engine


def qstep(engine: Engine) -> None:
    """EngineCore.step_with_batch_queue (depth 2), or EngineCore.step (depth 1)."""
    sched, q = engine.scheduler, engine.queue
    if sched.has_requests():
        out = sched.schedule()
        q.appendleft((out, engine.runner.execute(out)))
        if len(q) < engine.depth:
            return
    if not q:
        return
    out, res = q.pop()
    for outputs in sched.update_from_output(out, res).values():
        for o in outputs.outputs:
            engine._sampled.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason is not None:
                engine.finished[o.request_id] = Finished(
                    o.request_id, o.finish_reason, o.kv_transfer_params,
                    engine._sampled.pop(o.request_id))


def qrun(engine: Engine, rid: str, max_steps: int = 200) -> Finished:
    for _ in range(max_steps):
        if rid in engine.finished and not engine.queue:
            return engine.finished[rid]
        qstep(engine)
    raise AssertionError("did not finish")
