"""How long `pf` takes to start: `pf --help` and `pf log` against a bare Python start.

    .venv/bin/python bench/cli_startup.py [--runs 15]

Each command runs as a fresh process (as a user types it), `--runs` times, interleaved; the
table shows the median wall time, its ratio to `python -c pass`, and the fastest run (what the
command costs when nothing else runs: on a shared machine the median carries other work's load).
`pf log` reads a store of 50 snapshots in a history (built once under .bench/cli-store). The
target is 0.3 s for both, on the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / ".bench" / "cli-store"
TARGET_S = 0.3


def build_store() -> None:
    from processfork.store import Manifest, SnapshotSequence, Store

    if (STORE / "data.mdb").exists():
        return
    with Store(STORE) as store:
        parent: str | None = None
        for i in range(50):
            tokens = list(range(i, i + 64))
            pages = [os.urandom(1024) for _ in range(4)]
            digests = [d.hex() for d in store.put_pages(pages).digests]
            seq = SnapshotSequence(store.put_tokens(tokens), [(digests[0], digests[1]),
                                                       (digests[2], digests[3])])
            manifest = Manifest(name="main", parents=[parent] if parent else [],
                                fingerprint={"block_size": 32, "model": "bench"}, sequences=[seq])
            parent = store.write_snapshot(manifest, ref="main", move_head=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    opts = parser.parse_args()
    build_store()
    # A wheel install compiles bytecode when it installs; an editable checkout under
    # PYTHONDONTWRITEBYTECODE would recompile every module on every start instead.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "processfork_cli"),
                    str(REPO / "store")], check=True)
    pf = [sys.executable, "-m", "processfork_cli"]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "pf --help": [*pf, "--help"],
        "pf log": [*pf, "--store", str(STORE), "log", "-n", "20"],
        "pf version": [*pf, "version"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(opts.runs):
        for name, argv in commands.items():
            t = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["python -c pass"])
    table = Table(title=f"Start-up, median of {opts.runs} runs (load average "
                        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    for col in ("command", "median", "x bare Python", "fastest", f"target {TARGET_S} s"):
        table.add_column(col, justify="left" if col == "command" else "right")
    for name, xs in times.items():
        med = statistics.median(xs)
        ok = "-" if name == "python -c pass" else ("PASS" if med <= TARGET_S else "MISS")
        table.add_row(name, f"{med * 1000:.0f} ms", f"{med / base:.1f}", f"{min(xs) * 1000:.0f} ms",
                      ok)
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
