"""ProcessForkConnector: vLLM's KV-connector API as our data plane.

vLLM builds this class twice: once with the SCHEDULER role inside EngineCore (it
plans which blocks to save or load, see ``scheduler_side``) and once with the
WORKER role inside each worker (it moves the bytes, see ``worker_side``).  This
class only forwards each hook to the helper for its role.

Enable it with::

    --kv-transfer-config '{"kv_connector": "ProcessForkConnector",
                           "kv_connector_module_path": "processfork.plugin.connector",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"store": "/path/to/store"}}'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from .connector_config import ConnectorConfig
from .jobs import StepPlan
from .kv_groups import GroupLayout
from .vllm_compat import CacheHitSource, check_supported_vllm

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("processfork.plugin.connector")

__all__ = ["ProcessForkConnector", "ProcessForkMetadata"]


@dataclass
class ProcessForkMetadata(StepPlan, KVConnectorMetadata):
    """The step plan, typed as vLLM's connector metadata."""


class ProcessForkConnector(KVConnectorBase_V1, SupportsHMA):
    """Snapshots and checkouts of paged KV through the ProcessFork store.

    It handles every KV-cache group of vLLM's hybrid KV cache manager (``SupportsHMA``), so
    configuring it leaves that manager on: without the declaration vLLM turns it off, and a
    model with sliding-window layers gets a smaller, slower cache (plugin/kv_groups.py).
    """

    # vLLM >= 0.32 labels prompt tokens served by a connector by source in /metrics; older
    # versions have no such label (and no such module).
    if CacheHitSource is not None:
        _cache_hit_source = CacheHitSource.DISK

    @property
    def requires_kv_delivery(self) -> bool:
        # Saves copy their blocks inside the step that computed them; only a finished session
        # turn's sliding windows are copied after its request ends, and a preempted request
        # owes nobody its blocks.
        return False

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ):
        check_supported_vllm()
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = ConnectorConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self.store_path = config.store
        self._scheduler = None
        self._worker = None
        self._saved_plan: StepPlan | None = None
        layout = GroupLayout.from_kv_cache_config(kv_cache_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        sessions = config.sessions_at(tp)
        if tp > 1 and config.sessions is None and role == KVConnectorRole.SCHEDULER:
            logger.info("processfork: sessions are off at tensor_parallel_size=%d (not "
                        "supported yet); snapshots, checkouts and transparent restores work", tp)
        if role == KVConnectorRole.SCHEDULER:
            from .scheduler_side import SchedulerSide

            self._scheduler = SchedulerSide(
                vllm_config, kv_cache_config, store_path=self.store_path,
                auto_restore=config.auto_restore, sessions=sessions,
                session_prefix=config.session_prefix, remote=config.remote,
                remote_refresh_s=config.remote_refresh_s,
            )
        else:
            from .worker_side import WorkerSide

            self._worker = WorkerSide(
                vllm_config,
                self.store_path,
                verify_loads=config.verify_loads,
                pipelined_loads=config.pipelined_loads,
                page_path=config.page_path,
                staging_mib=config.staging_mib,
                staging_slots=config.staging_slots,
                streaming_stores=config.streaming_stores,
                copy_threads=config.copy_threads,
                page_reader=config.page_reader,
                host_tier_mib=config.host_tier_mib,
                host_tier_dir=config.host_tier_dir,
                kv_groups=layout.to_fingerprint(),
            )

    # ==============================
    # Worker-side hooks (worker process)
    # ==============================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # First of the step's hooks: vLLM may start loads after the forward pass.
        if self._worker is not None and isinstance(connector_metadata, StepPlan):
            self._worker.begin_step(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        plan = self._connector_metadata
        if isinstance(plan, StepPlan) and plan.loads:
            self._worker.start_load(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Called before each attention layer; loads of that layer may still be in flight.
        if self._worker is not None:
            self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # whole blocks are copied once, after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        self._save_step()

    def _save_step(self) -> None:
        """Run this step's saves once, from whichever hook comes first."""
        assert self._worker is not None
        plan = getattr(self, "_connector_metadata", None)
        if isinstance(plan, StepPlan) and plan.saves and plan is not self._saved_plan:
            self._saved_plan = plan
            self._worker.save(plan)

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._worker is None:
            return set()
        # vLLM 0.26-0.30 skip wait_for_save in a step without a forward pass, which is what a
        # snapshot of cached blocks schedules; every version calls this hook in every step.
        self._save_step()
        return self._worker.take_load_errors()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # Sending: a finished session turn whose sliding-window blocks vLLM kept for us (freed
        # once the save has copied them). Asynchronous loads (under async scheduling) finish in
        # the step that runs them. The finished ids let the worker forget jobs. vLLM 0.30 and
        # later ask get_transfer_results, whose default reads this.
        if self._worker is None:
            return None, None
        self._worker.forget_requests(finished_req_ids)
        return self._worker.take_released() or None, self._worker.take_finished_loads() or None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.close()

    # ==============================
    # Scheduler-side hooks (EngineCore process)
    # ==============================
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        # Scheduler side only: vLLM asks after every step and adds the answer to its stats.
        if self._scheduler is None:
            return None
        data = self._scheduler.take_stats()
        if not data:
            return None
        from .metrics import ProcessForkStats

        return ProcessForkStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        from .metrics import ProcessForkStats

        return ProcessForkStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        # In the API server: the processfork_* counters on /metrics (plugin/metrics.py).
        from .metrics import ProcessForkPromMetrics

        return ProcessForkPromMetrics(vllm_config, metric_types, labelnames,
                                      per_engine_labelvalues)

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        # vLLM 0.26-0.29 call this directly; later versions from bind_kv_cache_manager.
        if self._scheduler is not None:
            self._scheduler.bind_block_pool(gpu_block_pool)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self._scheduler is None:
            return
        if connector_output.invalid_block_ids:
            self._scheduler.forget_blocks(set(connector_output.invalid_block_ids))
        if connector_output.finished_sending:
            self._scheduler.sent(connector_output.finished_sending)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        plan = self._scheduler.build_step_plan(scheduler_output)
        return ProcessForkMetadata(loads=plan.loads, saves=plan.saves,
                                   fresh_blocks=plan.fresh_blocks)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        # vLLM's hook under the hybrid KV cache manager: one block table per group, as they are
        # now (a session turn's window saves take their blocks from them).
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, tuple(block_ids))
