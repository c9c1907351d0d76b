"""The connector's counters on vLLM's ``/metrics``: ``processfork_*``.

The scheduler side counts (in EngineCore) and hands vLLM the increments since its last step
(``get_kv_connector_stats``); vLLM carries them to the API server with its own scheduler stats,
where ``ProcessForkPromMetrics`` adds them to Prometheus counters, one child per engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

__all__ = ["COUNTERS", "ProcessForkPromMetrics", "ProcessForkStats"]

#: stats key -> (Prometheus name, without the ``_total`` a counter gets; help text)
COUNTERS: dict[str, tuple[str, str]] = {
    "lookups": ("processfork_prefix_lookups",
                "Prefix-index lookups for client requests (transparent restores, session turns)"),
    "hits": ("processfork_prefix_lookup_hits", "Prefix-index lookups that found stored blocks"),
    "restored_requests": ("processfork_restored_requests",
                          "Client requests that loaded a stored prefix without a checkout"),
    "restored_tokens": ("processfork_restored_tokens",
                        "Prompt tokens loaded from the store by transparent restores"),
    "failed_blocks": ("processfork_load_failed_blocks",
                      "Blocks whose load from the store failed and that vLLM recomputed"),
    "session_turns": ("processfork_session_turns", "Session turns committed to the store"),
    "session_turn_failures": ("processfork_session_turn_failures",
                              "Session turns that could not be committed"),
    "session_blocks_saved": ("processfork_session_blocks_saved",
                             "Blocks session turns saved (blocks the store already held excluded)"),
    "remote_fetches": ("processfork_remote_fetches",
                       "Snapshots fetched from the remote for transparent restores"),
    "remote_fetch_failures": ("processfork_remote_fetch_failures",
                              "Fetches for transparent restores that failed (the requests computed)"),
    "remote_fetched_bytes": ("processfork_remote_fetched_bytes",
                             "Object bytes fetched from the remote for transparent restores"),
    "remote_waits": ("processfork_remote_waits",
                     "Client requests that waited for a fetch from the remote"),
}


@dataclass
class ProcessForkStats(KVConnectorStats):
    """Counter increments: ``data`` maps a ``COUNTERS`` key to how much it grew."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in (other.data or {}).items():
            if key in COUNTERS:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {key: self.data.get(key, 0) for key in COUNTERS}

    def is_empty(self) -> bool:
        return not any(self.data.get(key) for key in COUNTERS)


def _unregister(name: str) -> None:
    """Drop a collector of this name left by an earlier logger of this process (Prometheus
    refuses a second registration of one name)."""
    from prometheus_client import REGISTRY

    for collector, names in list(REGISTRY._collector_to_names.items()):
        if name in names or f"{name}_total" in names:
            REGISTRY.unregister(collector)


class ProcessForkPromMetrics(KVConnectorPromMetrics):
    """One Prometheus counter per ``COUNTERS`` key, labelled like vLLM's own metrics."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters: dict[str, dict[int, Any]] = {}
        for key, (name, doc) in COUNTERS.items():
            _unregister(name)
            counter = self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
            self.counters[key] = {
                idx: counter.labels(*values) for idx, values in per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in (transfer_stats_data or {}).items():
            children = self.counters.get(key)
            if children is not None and value and engine_idx in children:
                children[engine_idx].inc(value)
