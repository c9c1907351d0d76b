"""Where a restore's time goes on the CPU backend: the loader thread's copy and verification.

    .venv/bin/python bench/restore_load_profile.py --store STORE --ref REF [--repeat 5]

A transparent restore (or a checkout) on the CPU backend hands its blocks to the worker's
``PipelinedLoader`` (plugin/loader.py): a helper thread, on the cores the worker's OpenMP threads
do not use, copies the stored pages into the KV blocks layer by layer, while the forward pass
waits for each layer only, then verifies every page's digest; the step's outcome waits for that
check. On an idle machine the copy keeps ahead of the forward pass and the restore costs what a
warm prefix-cache hit costs; when the loader's core is busy with other work, the loader's wall
time grows past the forward pass, and the difference is the restore's extra time to first token.

This runs the product's loader itself, on the pages of a stored snapshot (``--ref``, e.g. one
``bench/auto_restore_bench.py`` left in ``.bench/auto_restore/store``), into KV buffers of the
snapshot's page size, with this thread pinned like a worker (``--worker-cpus``, default 0) so
that the loader takes the other cores, as in a server. Per repetition: the wall time until every
layer is copied and until the pages are verified, and the CPU time the loader thread got over
that time (from ``/proc``). The load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from processfork.plugin.block_views import BlockViews
from processfork.plugin.loader import LoadItem, PipelinedLoader
from processfork.store import Store
from rich.console import Console
from rich.table import Table


def thread_cpu_seconds(native_id: int) -> float:
    """User + system CPU time of one thread of this process."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_thread() -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == "processfork-loader")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--ref", required=True, help="a stored snapshot (ref or cid)")
    parser.add_argument("--layers", type=int, default=12, help="layers per page (bench: 12)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--worker-cpus", default="0", help="cores of the worker's thread")
    opts = parser.parse_args()
    os.sched_setaffinity(0, {int(c) for c in opts.worker_cpus.split(",")})
    load_start = os.getloadavg()
    with Store(opts.store) as store:
        manifest = store.get_snapshot(store.resolve(opts.ref))
        pages = manifest.sequences[0].pages
        page_bytes = store.with_page_views([bytes.fromhex(pages[0][0])], lambda v: len(v[0]))
    if page_bytes % opts.layers:
        raise SystemExit(f"pages of {page_bytes} bytes do not split into {opts.layers} layers")
    per_layer = page_bytes // opts.layers
    blocks = len(pages)
    k = [torch.zeros(blocks, per_layer, dtype=torch.uint8) for _ in range(opts.layers)]
    v = [torch.zeros(blocks, per_layer, dtype=torch.uint8) for _ in range(opts.layers)]
    items = [LoadItem(b, bytes.fromhex(kd), bytes.fromhex(vd), "profile")
             for b, (kd, vd) in enumerate(pages)]
    rows = []
    with Store(opts.store) as store:
        loader = PipelinedLoader(store, BlockViews(k, v), verify=True, page_bytes=page_bytes)
        tid = loader_thread().native_id
        for _ in range(opts.repeat + 1):  # the first one maps the pages: left out
            cpu0, t0 = thread_cpu_seconds(tid), time.perf_counter()
            ticket = loader.submit(items)
            ticket.wait_layer(opts.layers - 1)
            copied = time.perf_counter() - t0
            ticket.wait()
            done = time.perf_counter() - t0
            cpu = thread_cpu_seconds(tid) - cpu0
            if ticket.bad_blocks:
                raise SystemExit(f"{len(ticket.bad_blocks)} blocks failed: {ticket.failures}")
            rows.append((copied, done, cpu))
        loader.close()
    rows = rows[1:]
    mib = 2 * blocks * page_bytes / (1 << 20)
    table = Table(title=f"loader: {blocks} blocks, {mib:,.0f} MiB, {opts.repeat} repetitions; "
                        f"load average {load_start[0]:.1f} at the start, "
                        f"{os.getloadavg()[0]:.1f} at the end")
    for col in ("", "copied (all layers)", "verified", "loader CPU time", "CPU / wall"):
        table.add_column(col, justify="right")
    for label, pick in (("median", statistics.median), ("best", min)):
        copied, done, cpu = (pick(r[i] for r in rows) for i in range(3))
        share = pick(r[2] / r[1] for r in rows)
        table.add_row(label, f"{copied * 1000:,.1f} ms", f"{done * 1000:,.1f} ms",
                      f"{cpu * 1000:,.0f} ms", f"{share:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
