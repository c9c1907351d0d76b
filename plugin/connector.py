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

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .jobs import StepPlan

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)

__all__ = ["ProcessForkConnector", "ProcessForkMetadata", "store_path_from_config"]


@dataclass
class ProcessForkMetadata(StepPlan, KVConnectorMetadata):
    """The step plan, typed as vLLM's connector metadata."""


def store_path_from_config(extra: dict[str, Any]) -> str:
    """The store directory: extra config ``store``, else ``$PF_STORE``, else ``~/.processfork``."""
    path = extra.get("store") or os.environ.get("PF_STORE") or "~/.processfork"
    return os.path.abspath(os.path.expanduser(str(path)))


def _flag(extra: dict[str, Any], name: str, default: bool = True) -> bool:
    value = extra.get(name)
    return default if value is None else str(value).lower() not in ("0", "false", "no")


class ProcessForkConnector(KVConnectorBase_V1):
    """Snapshots and checkouts of paged KV through the ProcessFork store."""

    _cache_hit_source = CacheHitSource.DISK

    @property
    def requires_kv_delivery(self) -> bool:
        # Saves finish inside the step that computed the blocks; nothing is handed
        # off after a request ends, so a preempted request owes nobody its blocks.
        return False

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.store_path = store_path_from_config(extra)
        self._scheduler = None
        self._worker = None
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError(
                "ProcessForkConnector supports tensor_parallel_size=1 only "
                f"(got {vllm_config.parallel_config.tensor_parallel_size})"
            )
        if role == KVConnectorRole.SCHEDULER:
            from .scheduler_side import SchedulerSide

            self._scheduler = SchedulerSide(vllm_config, kv_cache_config)
        else:
            from .worker_side import WorkerSide

            self._worker = WorkerSide(
                vllm_config,
                self.store_path,
                verify_loads=_flag(extra, "verify_loads"),
                pipelined_loads=_flag(extra, "pipelined_loads"),
            )

    # ==============================
    # Worker-side hooks (worker process)
    # ==============================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

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
        assert self._worker is not None
        plan = self._connector_metadata
        if isinstance(plan, StepPlan) and plan.saves:
            self._worker.save(plan)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # ==============================
    # Scheduler-side hooks (EngineCore process)
    # ==============================
    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self._scheduler is not None:
            self._scheduler.bind_kv_cache_manager(kv_cache_manager)

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

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        plan = self._scheduler.build_step_plan(scheduler_output)
        return ProcessForkMetadata(loads=plan.loads, saves=plan.saves)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return False, self._scheduler.request_finished(request)
