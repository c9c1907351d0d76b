"""Wall-clock marks of a checkout's phases in every process of the engine, for finding where
its time goes.

A checkout crosses three processes (the API server, EngineCore's scheduler, the worker) and the
server's own timing covers only the whole. With ``PROCESSFORK_TRACE=1`` in the server's
environment each phase logs one line, ``processfork trace EVENT JOB TIME [KEY=VALUE...]``, where
JOB is the checkout job that every process knows and TIME is ``time.time()``, comparable across
the processes of one machine. ``bench/trace_phases.py`` turns a server log into a table of
phase durations. Off (one global test per mark) by default.
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger("processfork.plugin.trace")

ENABLED = os.environ.get("PROCESSFORK_TRACE", "").strip().lower() not in ("", "0", "false", "no")


def mark(event: str, job: str, at: float | None = None, **info: object) -> None:
    """Log that ``event`` of ``job`` happened now (or at ``at``, a ``time.time()``)."""
    if not ENABLED:
        return
    extra = "".join(f" {k}={v}" for k, v in info.items())
    logger.info("processfork trace %s %s %.6f%s", event, job,
                time.time() if at is None else at, extra)
