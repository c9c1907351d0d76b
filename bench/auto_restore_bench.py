"""Time to first token after a restart: a transparent restore against checkout + completion and
against a warm prefix-cache hit, and the cost of a lookup that finds nothing.

    .venv/bin/python bench/auto_restore_bench.py [--preset tiny|bench] [--lengths 1024,4096]

One server with our connector. Each prompt is computed, snapshotted, and the server restarted
(a cold engine: nothing resident). Then, per repetition, after ``/reset_prefix_cache``:

(r) transparent restore: the completion alone, no checkout; checked: every loadable token came
    from the store (``kv_transfer_params.processfork.loaded_tokens``);
(c) ``POST /checkout``, then the completion (both timed, client-side);
(d) a warm prefix-cache hit: the same completion again;
(m) a prompt of the same length that matches nothing stored (a miss: one index lookup, then a
    full prefill), against (a) the same with ``auto_restore`` off on a second server.

All greedy, ``max_tokens=1``, timed over HTTP. The first token must agree between (r), (c) and
(d). ``--miss-max-len N`` measures (m) and (a) only for prompts of at most N tokens: they are cold
prefills, minutes each at 16K tokens on a small CPU machine, and say nothing about the restore.
Raw numbers (with the load average at the start and the end): ``.bench/auto_restore.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH_DIR,
    PF,
    Server,
    check,
    console,
    first_token,
    fresh_dir,
    median,
    model_path,
    ms,
    tokens,
    write_json,
)
from rich.table import Table

BLOCK = 32


def loadable(n: int) -> int:
    return (n - 1) // BLOCK * BLOCK


def server_args(max_len: int) -> list[str]:
    return ["--dtype", "float32", "--max-model-len", str(max_len + 64),
            "--max-num-batched-tokens", str(max_len), "--enable-prompt-tokens-details"]


def loaded(completion: dict) -> int:
    params = completion.get("kv_transfer_params") or {}
    return int((params.get("processfork") or {}).get("loaded_tokens", 0))


def run(model: Path, lengths: list[int], reps: int, args: list[str], miss_max: int) -> dict:
    out: dict = {L: {"r": [], "c": [], "d": [], "m": [], "a": [], "tokens": {}} for L in lengths}
    prompts = {L: tokens(L, L) for L in lengths}
    store = fresh_dir(BENCH_DIR / "auto_restore" / "store")
    with Server("auto-restore", model, "pf", store, args) as srv:
        for L in lengths:
            srv.complete(prompts[L])
            srv.post(f"{PF}/snapshot", {"name": f"ttft-{L}", "token_ids": prompts[L]})
        srv.restart()
        for i in range(2):
            srv.complete(tokens(910 + i, 64))  # first requests after a start pay one-time costs
        for L in lengths:
            for r in range(reps):
                srv.reset_prefix_cache()
                t, comp = srv.complete(prompts[L])
                check(loaded(comp) == loadable(L), f"restore of {L} loaded {loaded(comp)}")
                out[L]["r"].append(t)
                out[L]["tokens"]["r"] = first_token(comp)
                t, comp = srv.complete(prompts[L])
                out[L]["d"].append(t)
                out[L]["tokens"]["d"] = first_token(comp)
                srv.reset_prefix_cache()
                t1, co = srv.timed(f"{PF}/checkout", {"cid": f"ttft-{L}"})
                check(co["tokens_loaded"] == loadable(L), "checkout loaded less")
                t2, comp = srv.complete(prompts[L])
                out[L]["c"].append(t1 + t2)
                out[L]["tokens"]["c"] = first_token(comp)
                if L > miss_max:
                    continue
                t, comp = srv.complete(tokens(5000 + 10 * L + r, L))
                check(loaded(comp) == 0, "a miss loaded something")
                out[L]["m"].append(t)
    if all(L > miss_max for L in lengths):
        return out
    off = fresh_dir(BENCH_DIR / "auto_restore" / "store-off")
    with Server("auto-restore-off", model, "pf", off, args,
                connector_extra={"auto_restore": False}) as srv:
        for i in range(2):
            srv.complete(tokens(910 + i, 64))
        for L in (L for L in lengths if L <= miss_max):
            for r in range(reps):
                t, comp = srv.complete(tokens(5000 + 10 * L + r, L))
                out[L]["a"].append(t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--miss-max-len", type=int, default=None,
                        help="measure the misses (m) and (a) only up to this many tokens")
    opts = parser.parse_args()
    lengths = [int(x) for x in opts.lengths.split(",")]
    miss_max = max(lengths) if opts.miss_max_len is None else opts.miss_max_len
    load_start = os.getloadavg()
    out = run(model_path(opts.preset), lengths, opts.reps, server_args(max(lengths)), miss_max)
    table = Table(title=f"TTFT after a restart, {opts.preset} model, median of {opts.reps}")
    for col in ("tokens", "restore (r)", "checkout + request (c)", "warm hit (d)", "r / d",
                "c / d", "miss, on (m)", "miss, off (a)", "m / a"):
        table.add_column(col, justify="right")
    for L in lengths:
        row = out[L]
        r, c, d = (median(row[k]) for k in ("r", "c", "d"))
        same = len(set(row["tokens"].values())) == 1
        check(same, f"first tokens differ at {L}: {row['tokens']}")
        misses = ([ms(median(row["m"])), ms(median(row["a"])),
                   f"{median(row['m']) / median(row['a']):.3f}"] if L <= miss_max
                  else ["-", "-", "-"])
        table.add_row(str(L), ms(r), ms(c), ms(d), f"{r / d:.2f}", f"{c / d:.2f}", *misses)
    console.print(table)
    write_json("auto_restore", {"preset": opts.preset, "lengths": lengths, "reps": opts.reps,
                                "miss_max_len": miss_max, "loadavg_start": load_start,
                                "results": {str(L): out[L] for L in lengths}})


if __name__ == "__main__":
    main()
