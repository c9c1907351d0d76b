"""Checkout phase marks (``PROCESSFORK_TRACE=1``) and the table bench/trace_phases.py makes of
them: each phase is the time between two marks of the same job, across processes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from processfork.plugin import trace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import trace_phases


def test_marks_are_logged_only_when_tracing_is_on(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="processfork.plugin.trace")
    monkeypatch.setattr(trace, "ENABLED", False)
    trace.mark("api.begin", "job1", tokens=4)
    assert not caplog.records
    monkeypatch.setattr(trace, "ENABLED", True)
    trace.mark("api.begin", "job1", at=12.5, tokens=4)
    assert caplog.records[-1].getMessage() == "processfork trace api.begin job1 12.500000 tokens=4"


def test_phases_are_the_gaps_between_one_jobs_marks_grouped_by_kind_and_length():
    def line(event: str, job: str, at: float, extra: str = "") -> str:
        return f"(EngineCore pid=1) INFO [trace.py:28] processfork trace {event} {job} {at:.6f}{extra}"

    log = []
    for kind, steps in trace_phases.KINDS.items():
        events = [event for event, _ in steps]
        for job, scale in ((f"{kind}-a", 1.0), (f"{kind}-b", 3.0)):
            for i, event in enumerate(events):
                extra = " tokens=32768" if i == 0 else ""
                log.append(line(event, job, 100 + i * scale / 1000, extra))
    log.append(line("api.begin", "cut", 200.0, " tokens=32768"))  # no end: left out
    log.append(line("worker.begin", "auto", 300.0))  # a transparent restore: no API marks
    # A synchronous load (no worker.reported): its phase runs on to the next mark.
    sync = trace_phases.CHECKOUT
    for i, (event, _) in enumerate(sync):
        if event != "worker.reported":
            log.append(line(event, "sync", 400 + i / 1000, " tokens=1024" if i == 0 else ""))
    jobs = trace_phases.parse("\n".join(log))
    for kind, steps in trace_phases.KINDS.items():
        found = trace_phases.phases(jobs, kind)
        assert sorted(found) == ([1024, 32768] if kind == "checkout" else [32768])
        for event, _ in steps[:-1]:
            assert found[32768][event] == pytest.approx([1.0, 3.0])
        assert found[32768]["total"] == pytest.approx([len(steps) - 1, 3 * (len(steps) - 1)])
    sync_phases = trace_phases.phases(jobs)[1024]
    assert sync_phases["worker.host"] == pytest.approx([2.0])
    assert "worker.reported" not in sync_phases
