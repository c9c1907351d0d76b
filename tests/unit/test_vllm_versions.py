"""The connector's answers to the ways vLLM 0.26-0.33 call it, each way exercised here.

Only vLLM 0.32 is installed, so the older call orders are replayed by hand on a connector whose
worker and scheduler helpers are recorders: which hook a version calls, and in which order, is
the difference (docs/gpu.md lists them), not the hooks' signatures.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from processfork.plugin import connector as connector_module
from processfork.plugin import vllm_compat
from processfork.plugin.connector import ProcessForkConnector, ProcessForkMetadata


class _Worker:
    """Records what the connector asks of its worker helper."""

    def __init__(self) -> None:
        self.saved: list[Any] = []
        self.begun: list[Any] = []
        self.forgotten: list[set[str]] = []

    def begin_step(self, plan: Any) -> None:
        self.begun.append(plan)

    def save(self, plan: Any) -> None:
        self.saved.append(plan)

    def take_load_errors(self) -> set[int]:
        return {7}

    def forget_requests(self, ids: set[str]) -> None:
        self.forgotten.append(set(ids))

    def take_released(self) -> set[str]:
        return {"turn-1"}

    def take_finished_loads(self) -> set[str]:
        return set()


class _Scheduler:
    def __init__(self) -> None:
        self.pool: Any = None

    def bind_block_pool(self, pool: Any) -> None:
        self.pool = pool


def _connector(worker: _Worker | None = None, scheduler: _Scheduler | None = None):
    """A connector of either role without an engine: only the helpers its hooks forward to."""
    conn = object.__new__(ProcessForkConnector)
    conn._worker = worker
    conn._scheduler = scheduler
    conn._saved_plan = None
    conn._connector_metadata = None
    return conn


def _plan_with_a_save() -> ProcessForkMetadata:
    return ProcessForkMetadata(saves=[SimpleNamespace(req_id="r", block_ids=[3])])


def test_a_step_with_a_forward_pass_saves_once():
    # Every version: wait_for_save, then get_block_ids_with_load_errors in the same step.
    worker = _Worker()
    conn = _connector(worker=worker)
    plan = _plan_with_a_save()
    conn.bind_connector_metadata(plan)
    conn.wait_for_save()
    assert conn.get_block_ids_with_load_errors() == {7}
    assert worker.saved == [plan] and worker.begun == [plan]


def test_a_step_without_a_forward_pass_still_saves():
    # vLLM 0.26-0.30 skip wait_for_save in such a step (a snapshot of cached blocks).
    worker = _Worker()
    conn = _connector(worker=worker)
    first, second = _plan_with_a_save(), _plan_with_a_save()
    conn.bind_connector_metadata(first)
    assert conn.get_block_ids_with_load_errors() == {7}
    conn.bind_connector_metadata(second)
    conn.get_block_ids_with_load_errors()
    conn.wait_for_save()
    assert worker.saved == [first, second]


def test_the_block_pool_arrives_either_way():
    pool = object()
    # vLLM 0.26-0.29: the scheduler calls bind_gpu_block_pool itself.
    old = _connector(scheduler=_Scheduler())
    old.bind_gpu_block_pool(pool)
    assert old._scheduler.pool is pool
    # vLLM 0.30 and later: bind_kv_cache_manager, whose default passes the manager's pool on.
    new = _connector(scheduler=_Scheduler())
    if not hasattr(new, "bind_kv_cache_manager"):
        pytest.skip("this vLLM has no bind_kv_cache_manager")
    new.bind_kv_cache_manager(SimpleNamespace(block_pool=pool))
    assert new._scheduler.pool is pool


def test_finished_transfers_arrive_either_way():
    # vLLM 0.26-0.29 call get_finished; 0.30 and later get_transfer_results, whose default
    # reads get_finished.
    worker = _Worker()
    conn = _connector(worker=worker)
    assert conn.get_finished({"a"}) == ({"turn-1"}, None)
    if not hasattr(conn, "get_transfer_results"):
        pytest.skip("this vLLM has no get_transfer_results")
    results = conn.get_transfer_results({"b"})
    assert results.finished_sending == {"turn-1"} and results.finished_recving == set()
    assert worker.forgotten == [{"a"}, {"b"}]


def _fresh_copy(module: Any, name: str) -> Any:
    """Execute a module's file again under another name, so its import-time choices rerun."""
    spec = importlib.util.spec_from_file_location(name, Path(module.__file__))
    assert spec is not None and spec.loader is not None
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy


def test_the_cache_hit_source_label_when_vllm_has_it():
    # vLLM 0.32 and later: our tokens are counted as served from disk.
    if vllm_compat.CacheHitSource is None:
        pytest.skip("this vLLM has no cache_hit_source module")
    assert ProcessForkConnector._cache_hit_source is vllm_compat.CacheHitSource.DISK
    conn = _connector(scheduler=_Scheduler())
    assert conn.get_external_cache_hit_sources(SimpleNamespace(), 32) == {
        vllm_compat.CacheHitSource.DISK: 32
    }


def test_no_cache_hit_source_label_before_vllm_0_32(monkeypatch):
    # vLLM 0.26-0.31 have no such module: the import is skipped, and the connector sets no label.
    monkeypatch.setitem(sys.modules, "vllm.v1.metrics.cache_hit_source", None)
    compat = _fresh_copy(vllm_compat, "processfork.plugin._compat_without_source")
    assert compat.CacheHitSource is None
    monkeypatch.setattr(vllm_compat, "CacheHitSource", None)
    old = _fresh_copy(connector_module, "processfork.plugin._connector_without_source")
    assert "_cache_hit_source" not in old.ProcessForkConnector.__dict__
