"""Where a checkout's or a snapshot's time goes, from the log of a server run with
``PROCESSFORK_TRACE=1``.

    PROCESSFORK_TRACE=1 pf serve MODEL ... > server.log 2>&1   # then check out snapshots
    python3 bench/trace_phases.py server.log [--json phases.json]

Every process of the engine marks the phases of each checkout and snapshot job
(``plugin/trace.py``); this prints, per length, the median time of each phase over that
length's jobs, so the step that dominates is named with the numbers, not guessed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

from rich.console import Console
from rich.table import Table

LINE = re.compile(r"processfork trace (\S+) (\S+) (\d+\.\d+)((?: \S+=\S+)*)")

# The marks of one checkout in order, and what happens between each and the next. A load that
# is not asynchronous (vLLM's CPU build) has no ``worker.reported``: its ``worker.host`` phase
# runs to the first token. A missing mark joins the two phases around it.
CHECKOUT: list[tuple[str, str]] = [
    ("api.begin", "API server: manifest, tokens, checks"),
    ("api.submit", "into the engine: request processing, block hashes"),
    ("sched.match", "scheduler: lookups, block allocation"),
    ("sched.alloc", "scheduler to worker: step plan"),
    ("worker.begin", "worker: pages named, tokens checked"),
    ("worker.setup", "worker: pages looked up and copied, device copies queued"),
    ("worker.host", "device copies done, load reported"),
    ("worker.reported", "last block computed, first token back"),
    ("api.reply", "API server: the load's record read"),
    ("api.end", ""),
]
# The same for a snapshot of a sequence (``POST /snapshot``).
SNAPSHOT: list[tuple[str, str]] = [
    ("snap.begin", "API server: sequences, refs, parent"),
    ("snap.submit", "into the engine: request processing, block hashes"),
    ("sched.snapshot", "scheduler to worker: lookups, step plan"),
    ("worker.save", "worker: pages copied, hashed, committed with the job's record"),
    ("worker.saved", "API server sees the record"),
    ("snap.saved", "the engine's request ends"),
    ("snap.ended", "the token blob's commit awaited, pages collected"),
    ("snap.commit", "snapshot object and ref committed"),
    ("snap.end", ""),
]
KINDS = {"checkout": CHECKOUT, "snapshot": SNAPSHOT}


def parse(text: str) -> dict[str, dict[str, object]]:
    """Each job's marks (event -> time) and its info (``tokens=...``), from a log's text."""
    jobs: dict[str, dict[str, object]] = defaultdict(lambda: {"marks": {}, "info": {}})
    for match in LINE.finditer(text):
        event, job, at, extra = match.groups()
        entry = jobs[job]
        entry["marks"].setdefault(event, float(at))  # type: ignore[union-attr]
        for pair in extra.split():
            key, _, value = pair.partition("=")
            entry["info"].setdefault(key, value)  # type: ignore[union-attr]
    return dict(jobs)


def phases(jobs: dict[str, dict[str, object]], kind: str = "checkout"
           ) -> dict[int, dict[str, list[float]]]:
    """Per length (tokens): each phase's durations (ms) over the complete jobs of ``kind``,
    under the name of the mark it starts at, and their totals under ``total``."""
    order = [event for event, _ in KINDS[kind]]
    first, last = order[0], order[-1]
    out: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for entry in jobs.values():
        marks: dict[str, float] = entry["marks"]  # type: ignore[assignment]
        info: dict[str, str] = entry["info"]  # type: ignore[assignment]
        if first not in marks or last not in marks or "tokens" not in info:
            continue  # another kind, or cut off by the log's end
        length = int(info["tokens"])
        present = [event for event in order if event in marks]
        for start, end in pairwise(present):
            out[length][start].append((marks[end] - marks[start]) * 1e3)
        out[length]["total"].append((marks[last] - marks[first]) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--json", type=Path, help="also write every duration here")
    opts = parser.parse_args()
    jobs = parse(opts.log.read_text(errors="replace"))
    found = {kind: phases(jobs, kind) for kind in KINDS}
    if not any(found.values()):
        sys.exit(f"{opts.log}: no complete checkout or snapshot marks "
                 "(was PROCESSFORK_TRACE=1 set?)")
    for kind, by_length in found.items():
        if by_length:
            print_table(by_length, kind)
    if opts.json:
        opts.json.write_text(json.dumps(
            {kind: {str(n): v[n] for n in sorted(v)} for kind, v in found.items()}, indent=2)
            + "\n")


def print_table(found: dict[int, dict[str, list[float]]], kind: str = "checkout",
                title: str | None = None) -> None:
    table = Table(title=title or f"{kind.capitalize()} phases (median ms over each length's)")
    table.add_column("phase")
    lengths = sorted(found)
    for n in lengths:
        table.add_column(f"{n:,} tokens ({len(found[n]['total'])})", justify="right")
    steps = KINDS[kind]
    rows = [(event, label) for event, label in steps[:-1]]
    rows.append(("total", f"total, {steps[0][0]} to {steps[-1][0]}"))
    for start, label in rows:
        cells = [f"{statistics.median(found[n][start]):.1f}" if found[n].get(start) else "-"
                 for n in lengths]
        table.add_row(label, *cells)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
