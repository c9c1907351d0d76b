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


def test_phases_are_the_gaps_between_one_jobs_marks_grouped_by_length():
    def line(event: str, job: str, at: float, extra: str = "") -> str:
        return f"(EngineCore pid=1) INFO [trace.py:28] processfork trace {event} {job} {at:.6f}{extra}"

    events = [name for name, _, _ in trace_phases.PHASES] + ["api.end"]
    log = []
    for job, scale in (("a", 1.0), ("b", 3.0)):
        for i, event in enumerate(events):
            log.append(line(event, job, 100 + i * scale / 1000,
                            " tokens=32768" if event == "api.begin" else ""))
    log.append(line("api.begin", "cut", 200.0, " tokens=32768"))  # no end: left out
    log.append(line("sched.match", "auto", 300.0))  # not a checkout
    found = trace_phases.phases(trace_phases.parse("\n".join(log)))
    assert list(found) == [32768]
    for start, _, _ in trace_phases.PHASES:
        assert found[32768][start] == pytest.approx([1.0, 3.0])
    assert found[32768]["total"] == pytest.approx([len(trace_phases.PHASES), 3 * len(trace_phases.PHASES)])
