"""Where a checkout's time goes, from the log of a server run with ``PROCESSFORK_TRACE=1``.

    PROCESSFORK_TRACE=1 pf serve MODEL ... > server.log 2>&1   # then check out snapshots
    python3 bench/trace_phases.py server.log [--json phases.json]

Every process of the engine marks the phases of each checkout job (``plugin/trace.py``); this
prints, per checkout length, the median time of each phase over that length's checkouts, so
the step that dominates is named with the numbers, not guessed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

LINE = re.compile(r"processfork trace (\S+) (\S+) (\d+\.\d+)((?: \S+=\S+)*)")

# The marks of one checkout in order, and what happens between each and the next. A load that
# is not asynchronous (vLLM's CPU build) has no ``worker.reported``: its ``worker.host`` phase
# runs to the first token.
PHASES: list[tuple[str, str, str]] = [
    ("api.begin", "api.submit", "API server: manifest, tokens, checks"),
    ("api.submit", "sched.match", "into the engine: request processing, block hashes"),
    ("sched.match", "sched.alloc", "scheduler: lookups, block allocation"),
    ("sched.alloc", "worker.begin", "scheduler to worker: step plan"),
    ("worker.begin", "worker.setup", "worker: pages named, tokens checked"),
    ("worker.setup", "worker.host", "worker: pages looked up and copied, device copies queued"),
    ("worker.host", "worker.reported", "device copies done, load reported"),
    ("worker.reported", "api.reply", "last block computed, first token back"),
    ("api.reply", "api.end", "API server: the load's record read"),
]
ORDER = [start for start, _, _ in PHASES] + ["api.end"]


def parse(text: str) -> dict[str, dict[str, object]]:
    """Each job's marks (event -> time) and its info (``tokens=...``), from a log's text."""
    jobs: dict[str, dict[str, object]] = defaultdict(lambda: {"marks": {}, "info": {}})
    for match in LINE.finditer(text):
        event, job, at, extra = match.groups()
        entry = jobs[job]
        entry["marks"].setdefault(event, float(at))  # type: ignore[union-attr]
        for pair in extra.split():
            key, _, value = pair.partition("=")
            entry["info"][key] = value  # type: ignore[index]
    return dict(jobs)


def phases(jobs: dict[str, dict[str, object]]) -> dict[int, dict[str, list[float]]]:
    """Per checkout length: each phase's durations (ms) over the complete jobs of that length."""
    out: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for entry in jobs.values():
        marks: dict[str, float] = entry["marks"]  # type: ignore[assignment]
        info: dict[str, str] = entry["info"]  # type: ignore[assignment]
        if "api.begin" not in marks or "api.end" not in marks or "tokens" not in info:
            continue  # not a checkout, or cut off by the log's end
        length = int(info["tokens"])
        present = [event for event in ORDER if event in marks]
        for start, end in zip(present, present[1:]):  # a missing mark joins two phases
            out[length][start].append((marks[end] - marks[start]) * 1e3)
        out[length]["total"].append((marks["api.end"] - marks["api.begin"]) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--json", type=Path, help="also write every duration here")
    opts = parser.parse_args()
    found = phases(parse(opts.log.read_text(errors="replace")))
    if not found:
        sys.exit(f"{opts.log}: no complete checkout marks (was PROCESSFORK_TRACE=1 set?)")
    print_table(found)
    if opts.json:
        opts.json.write_text(json.dumps({str(n): found[n] for n in sorted(found)}, indent=2)
                             + "\n")


def print_table(found: dict[int, dict[str, list[float]]],
                title: str = "Checkout phases (median ms over the checkouts of each length)"
                ) -> None:
    table = Table(title=title)
    table.add_column("phase")
    lengths = sorted(found)
    for n in lengths:
        table.add_column(f"{n:,} tokens ({len(found[n]['total'])})", justify="right")
    for start, _, label in [*PHASES, ("total", "", "total, api.begin to api.end")]:
        cells = [f"{statistics.median(found[n][start]):.1f}" if found[n].get(start) else "-"
                 for n in lengths]
        table.add_row(label, *cells)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
