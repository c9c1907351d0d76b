"""Serving under load: what the plugin costs when nobody snapshots.

    .venv/bin/python bench/serve_bench.py [--quick] [--markdown] [--rounds N]
                                          [--model bench|bench-sliding] [--servers K ...]
                                          [--dataset prefix|random]
                                          [--store-snapshots N [--store-snapshot-tokens T]]

Three servers from the same launcher plan, all up for the whole run: ``pf serve`` with our KV
connector; the same with vLLM's no-op connector (``noop_connector.py``) instead of ours, which
separates what vLLM's connector machinery costs by itself from what ours adds; and the same
without ``--kv-transfer-config``. Same model, dtype, block size, KV cache size, prefix caching
on, worker pinned to the same cores (the thread count each worker really got is checked in its
log).

Load: ``vllm bench serve`` (run as ``python -m processfork.plugin.launcher bench serve``, vLLM's
own CLI) with its ``prefix_repetition`` dataset: a few long shared prefixes, each followed by a
short unique suffix, all requests sent at once under a fixed concurrency, fixed output length
(``--ignore-eos``). Runs rotate between the servers so that drift in the machine's load hits
all alike; each run starts from an empty prefix cache (``/reset_prefix_cache``) and sends the
same prompts (same seed). Stalled runs (see ``valid_runs``) are recorded and run again.
Reported: medians over runs of request and output token throughput and median TTFT, server CPU
time per request, and the time per token of a single request decoding alone (where a per-step
cost shows most), as ratios to the server without a connector.

Judged on paired ratios: each round runs every server once, back to back, so a round's ratio
(ours / none) compares two runs that saw the same machine; the verdict is the median of those
ratios, shown with its distribution-free 95% interval (order statistics of the paired ratios, no
assumption about how the runs are spread). A drift in the machine's load over the run moves both
runs of a round and cancels in the ratio, where a ratio of the two servers' medians keeps it.

``--servers ours none`` leaves out the no-op connector's server (a third server between the two
compared ones adds what a server inherits from the one run before it). ``--dataset random``:
random prompts of the same length, sharing no prefix: every run does the same prefill work,
where with ``prefix_repetition`` which requests hit the prefix cache depends on the order in
which the first ones were scheduled (the median TTFT is two-valued there).

``--store-snapshots N``: before the runs, our server's store is filled with N snapshots of
``--store-snapshot-tokens`` random tokens each, under the engine's own fingerprint (read from its
status and its record in the store), none of which any benchmark prompt starts with
(``store_fill.py``). Auto-restore is on (the default), so every request that misses vLLM's prefix
cache is looked up among them and found in none: the cost of a large store to a server whose
requests never match it. Checked: the filled snapshots are in the partition the engine looks up,
our server counts at least one lookup per benchmark request, and none of them hits.

Model: the bench model (12 layers, 24 KiB of KV per token), as for every other benchmark;
``--quick`` uses the tiny model, whose 2-3 ms engine steps make any per-step cost the largest
share it can be. Raw numbers: ``.bench/serve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH_DIR,
    Server,
    Target,
    check,
    console,
    fresh_dir,
    median,
    median_interval,
    model_path,
    targets_markdown,
    targets_table,
    vllm_bench_serve,
    write_json,
)
from kv_cache_size import cache_report
from processfork.store import Store
from processfork.store.prefix_index import partition_root
from store_fill import fill, found_blocks, index_entries

WORKLOAD = {
    "num_prefixes": 4,
    "prefix_len": 512,
    "suffix_len": 64,
    "output_len": 32,
    "max_concurrency": 8,
}


def dataset_args(dataset: str) -> list[str]:
    """``vllm bench serve``'s dataset arguments: the workload's prompts, shared or not."""
    w = WORKLOAD
    if dataset == "random":  # same lengths, no shared prefix: the same prefill work every run
        return ["--dataset-name", "random",
                "--random-input-len", str(w["prefix_len"] + w["suffix_len"]),
                "--random-output-len", str(w["output_len"]), "--random-range-ratio", "0"]
    return ["--dataset-name", "prefix_repetition",
            "--prefix-repetition-num-prefixes", str(w["num_prefixes"]),
            "--prefix-repetition-prefix-len", str(w["prefix_len"]),
            "--prefix-repetition-suffix-len", str(w["suffix_len"]),
            "--prefix-repetition-output-len", str(w["output_len"])]


def bench_serve(srv: Server, model: Path, num_prompts: int, out: Path, seed: int,
                dataset: str = "prefix") -> dict:
    """One ``vllm bench serve`` run of the workload; returns its result JSON."""
    return vllm_bench_serve(srv, model, dataset_args(dataset), num_prompts=num_prompts,
                            concurrency=WORKLOAD["max_concurrency"], seed=seed, out=out)


def paired_ratios(all_runs: dict[str, list[dict]], k: str, key: str) -> list[float]:
    """Server ``k`` over the server without a connector, round by round (valid runs only)."""
    none = {r["round"]: r for r in all_runs["none"] if r["valid"]}
    return [r[key] / none[r["round"]][key] for r in all_runs[k]
            if r["valid"] and r["round"] in none]


KEYS = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
        "median_tpot_ms", "median_e2el_ms")


def group_cpu_seconds(srv: Server) -> float:
    """User + system CPU time of every process of the server (API server, engine, worker).

    Less sensitive than wall time to other work on a shared machine: it counts what the server
    itself spent, whoever else was running.
    """
    assert srv.process is not None
    pgid = os.getpgid(srv.process.popen.pid)
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state, ppid, pgrp, ...
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


CONFIGS = {
    "ours": "with our connector",
    "noop": "with vLLM's no-op connector",
    "none": "without a connector",
}


MAX_MODEL_LEN = 2048
VOCAB = 1024
"""The model builder's vocabulary (bench and tiny presets): the filled snapshots' token ids."""
LOOKUPS = "processfork_prefix_lookups_total"
HITS = "processfork_prefix_lookup_hits_total"


def start_servers(model: Path, root: Path, name: str, which: list[str]) -> dict[str, Server]:
    args = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
            "--kv-cache-memory-bytes", "512M"]
    noop = json.dumps({"kv_connector": "NoopConnector", "kv_connector_module_path":
                       "noop_connector", "kv_role": "kv_both"}, separators=(",", ":"))
    servers = {
        "ours": Server("serve-ours", model, "pf", root / "store", args, served_name=name),
        # "custom": the launcher plan with this connector instead of ours (see harness.Server)
        "noop": Server("serve-noop", model, "custom", root / "unused-noop",
                       [*args, "--kv-transfer-config", noop], served_name=name,
                       env={"PYTHONPATH": str(Path(__file__).resolve().parent)}),
        "none": Server("serve-none", model, "plain", root / "unused", args, served_name=name),
    }
    servers = {k: servers[k] for k in which}
    for srv in servers.values():
        srv.start()
    return servers


def fill_store(srv: Server, snapshots: int, tokens: int) -> dict:
    """Fill ``srv``'s store with snapshots no prompt matches, in its engine's partition."""
    fingerprint = srv.status()["engine"]["fingerprint"]
    root = partition_root(fingerprint)
    with Store(srv.store) as store:  # what the engine's prefix lookup reads its fingerprint from
        records = [r["fingerprint"] for r in store.meta_items("engine:").values()
                   if isinstance(r.get("fingerprint"), dict)]
    check(bool(records) and all(partition_root(f) == root for f in records),
          f"{srv.name}: the engine's stored fingerprint is not the one its status reports")
    t = time.perf_counter()
    seqs = fill(srv.store, fingerprint, snapshots, tokens, vocab=VOCAB)
    seconds = time.perf_counter() - t
    block_size = int(fingerprint["block_size"])
    check(found_blocks(srv.store, fingerprint, seqs[-1]) == tokens // block_size,
          "the filled snapshots are not in the engine's partition")
    status = srv.status()["store"]
    info = {"snapshots": snapshots, "tokens": tokens, "index_entries": index_entries(srv.store),
            "fill_seconds": seconds, "store": status}
    console.log(f"{srv.name}: store filled with {snapshots:,} snapshots of {tokens:,} tokens "
                f"({info['index_entries']:,} index records) in {seconds:.0f} s")
    return info


STALL_FACTOR = 2.0


def valid_runs(all_runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each server's runs without the stalled ones.

    A stalled run: the load generator, starved of CPU on the core it shares with the servers'
    API server and EngineCore (which busy-waits for the worker), sends requests one at a time,
    and the engine runs them nearly serially: about six times the engine steps for the same
    tokens, a third of the throughput, ten times the TTFT. It happens with and without a
    connector (vLLM alone, too); it measures the client, not the server. Every run sends the
    same prompts, so a run is stalled when it took more than STALL_FACTOR times the fewest
    engine steps of any run.
    """
    steps = [r["engine_steps"] for v in all_runs.values() for r in v]
    if not steps:
        return {k: [] for k in all_runs}
    limit = STALL_FACTOR * min(steps)
    for v in all_runs.values():
        for r in v:
            r["valid"] = r["engine_steps"] <= limit
    return {k: [r for r in v if r["valid"]] for k, v in all_runs.items()}


def only(servers: dict[str, Server], k: str) -> Server:
    """Server ``k``, with every other server frozen: one server's processes run at a time."""
    for name, srv in servers.items():
        if name != k:
            srv.freeze(True)
    servers[k].freeze(False)
    time.sleep(1.5)  # let the previous server's worker finish spinning down (vLLM: 1 s)
    return servers[k]


def decode_ms_per_token(srv: Server, tokens_out: int) -> float:
    """One request alone, greedy, fixed length: wall time per generated token."""
    seconds, _ = srv.timed("/v1/completions", {
        "model": srv.served_name, "prompt": list(range(10, 74)), "max_tokens": tokens_out,
        "ignore_eos": True, "temperature": 0.0,
    })
    return seconds * 1000 / tokens_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and runs")
    parser.add_argument("--model", choices=["bench", "bench-sliding"], default="bench",
                        help="bench-sliding: the bench shape with five sliding-window layers "
                             "(window 256) to each full-attention layer")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument("--rounds", type=int, default=None, help="runs per server")
    parser.add_argument("--servers", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="which servers to run (ours and none are always among them)")
    parser.add_argument("--dataset", choices=["prefix", "random"], default="prefix",
                        help="prefix: shared prefixes (prefix_repetition); random: none shared")
    parser.add_argument("--store-snapshots", type=int, default=0,
                        help="fill our server's store with this many snapshots no prompt matches")
    parser.add_argument("--store-snapshot-tokens", type=int, default=MAX_MODEL_LEN,
                        help="tokens per filled snapshot (default: the servers' max-model-len)")
    opts = parser.parse_args()
    load_start = os.getloadavg()
    order = [k for k in CONFIGS if k in {*opts.servers, "ours", "none"}]

    preset = "tiny" if opts.quick else opts.model
    num_prompts = 64 if opts.quick else 32
    rounds = opts.rounds or (2 if opts.quick else 6)
    decode_tokens = 300 if opts.quick else 64
    model = model_path(preset)
    root = fresh_dir(BENCH_DIR / "serve")
    all_runs: dict[str, list[dict]] = {k: [] for k in order}
    runs: dict[str, list[dict]] = {}
    stalled: dict[str, int] = {}
    decode: dict[str, list[float]] = {k: [] for k in order}
    threads: dict[str, int] = {}
    servers: dict[str, Server] = {}
    caches: dict[str, dict[str, object]] = {}
    filled: dict = {}
    lookups: dict[str, float] = {}
    sent_to_ours = 0
    try:
        servers = start_servers(model, root, preset, order)
        threads = {k: s.threads() for k, s in servers.items()}
        # The token capacity each engine logs at start, its KV-cache groups, and whether vLLM
        # turned its hybrid KV cache manager off (a connector without SupportsHMA makes it).
        caches = {k: cache_report(s) for k, s in servers.items()}
        console.log("KV cache at start: " + ", ".join(
            f"{k} {c['tokens']:,} tokens, {c['groups']} group(s), hybrid manager "
            f"{'off' if c['hma_off'] else 'on'}" for k, c in caches.items()))
        check(len(set(threads.values())) == 1, f"thread counts differ: {threads}")
        if opts.store_snapshots:
            filled = fill_store(servers["ours"], opts.store_snapshots, opts.store_snapshot_tokens)
        n = len(order)
        for k in order:  # warm-up run, discarded
            only(servers, k).reset_prefix_cache()
            bench_serve(servers[k], model, num_prompts // 4, root / f"warmup-{k}.json", 1,
                        opts.dataset)
            sent_to_ours += num_prompts // 4 if k == "ours" else 0
            decode_ms_per_token(servers[k], 16)
        steps_metric = "vllm:iteration_tokens_total_count"
        attempt = 0
        while min(len(v) for v in valid_runs(all_runs).values()) < rounds \
                and attempt < 3 * rounds:
            done = valid_runs(all_runs)
            for k in order[attempt % n:] + order[: attempt % n]:  # rotate who goes first
                if len(done[k]) >= rounds:
                    continue
                srv = only(servers, k)
                srv.reset_prefix_cache()
                cpu0, steps0 = group_cpu_seconds(srv), srv.metric(steps_metric)
                result = bench_serve(srv, model, num_prompts, root / f"{k}-{attempt}.json", 0,
                                     opts.dataset)
                sent_to_ours += num_prompts if k == "ours" else 0
                cpu, steps = group_cpu_seconds(srv) - cpu0, srv.metric(steps_metric) - steps0
                all_runs[k].append({**{key: result[key] for key in KEYS}, "engine_steps": steps,
                                    "cpu_ms_per_request": cpu * 1000 / num_prompts,
                                    "round": attempt})
                console.log(f"{CONFIGS[k]}, attempt {attempt}: "
                            f"{result['request_throughput']:.2f} req/s, median TTFT "
                            f"{result['median_ttft_ms']:.1f} ms, {steps:.0f} engine steps")
            attempt += 1
        runs = {k: v[:rounds] for k, v in valid_runs(all_runs).items()}
        stalled = {k: len(all_runs[k]) - len(valid_runs(all_runs)[k]) for k in order}
        if opts.quick:  # never fails on the numbers; with no valid run, show the stalled ones
            runs = {k: v or all_runs[k] for k, v in runs.items()}
        else:
            check(all(len(runs[k]) == rounds for k in order), f"too many stalled runs: {stalled}")
        # Decode alone: one request at a time, so each engine step is as short as it gets and
        # a per-step cost shows most. Short runs, many interleaved repetitions.
        for r in range(rounds):
            for k in order[r % n:] + order[: r % n]:
                decode[k].append(decode_ms_per_token(only(servers, k), decode_tokens))
        # Every benchmark request missed vLLM's prefix cache somewhere (its unique suffix), so
        # with auto-restore on each was looked up in the store at least once; none may match.
        ours = only(servers, "ours")
        lookups = {"lookups": ours.metric(LOOKUPS), "hits": ours.metric(HITS),
                   "benchmark_requests": sent_to_ours}
    finally:
        for srv in servers.values():
            if srv.process is not None:
                srv.freeze(False)
            srv.stop()

    # Judged on the medians of the valid runs; the best run of each is shown next to them.
    best = {k: {"request_throughput": max(r["request_throughput"] for r in v),
                "output_throughput": max(r["output_throughput"] for r in v),
                "median_ttft_ms": min(r["median_ttft_ms"] for r in v),
                "cpu_ms_per_request": min(r["cpu_ms_per_request"] for r in v),
                "decode_ms": min(decode[k])} for k, v in runs.items()}
    med = {k: {**{key: median(r[key] for r in v) for key in (*KEYS, "cpu_ms_per_request")},
               "decode_ms": median(decode[k])} for k, v in runs.items()}
    ours_label = "our connector" + (f" ({opts.store_snapshots:,} snapshots stored)"
                                    if opts.store_snapshots else "")
    paired = {k: {key: paired_ratios(all_runs, k, key) for key in PAIRED}
              for k in order if k != "none"}
    targets = comparison(best, med, paired, "ours", ours_label, True)
    if "noop" in order:
        targets += comparison(best, med, paired, "noop", "vLLM's no-op connector", False)
    wl = WORKLOAD
    prompts = (f"{wl['num_prefixes']} shared prefixes of {wl['prefix_len']} + "
               f"{wl['suffix_len']} unique tokens" if opts.dataset == "prefix" else
               f"random prompts of {wl['prefix_len'] + wl['suffix_len']} tokens")
    title = (f"Serving, {preset} model: {num_prompts} requests x {rounds} runs per server "
             f"(stalled client runs, run again: {stalled}), "
             f"{prompts}, {wl['output_len']} output tokens, concurrency "
             f"{wl['max_concurrency']}; worker threads {threads.get('ours')}"
             + (f"; our store: {opts.store_snapshots:,} snapshots of "
                f"{opts.store_snapshot_tokens:,} tokens, none matching" if filled else ""))
    write_json("serve" if preset in ("bench", "tiny") else f"serve-{preset}", {
                         "model": preset, "workload": WORKLOAD, "num_prompts": num_prompts,
                         "rounds": rounds, "threads": threads, "loadavg_start": load_start,
                         "kv_cache_at_start": caches,
                         "store_fill": filled, "prefix_lookups": lookups, "runs": runs,
                         "all_runs": all_runs, "stalled": stalled, "decode_ms_per_token": decode,
                         "best": best, "median": med, "paired_ratios": paired,
                         "dataset": opts.dataset, "targets": targets})
    check(caches["ours"]["tokens"] == caches["none"]["tokens"],
          f"our engine's KV cache holds other tokens than the one without a connector: {caches}")
    check(lookups["hits"] == 0, f"a benchmark prompt matched a stored snapshot: {lookups}")
    check(lookups["lookups"] >= sent_to_ours, f"fewer lookups than requests: {lookups}")
    console.print(targets_table(title, targets))
    if opts.markdown:
        print(targets_markdown(targets))
    ok = all(t.ok is not False for t in targets)
    return 0 if ok or opts.quick else 1


PAIRED = ("request_throughput", "output_throughput", "median_ttft_ms", "cpu_ms_per_request")
"""The measures compared round by round (decode alone has its own rounds, not paired)."""


def comparison(best: dict, med: dict, paired: dict, k: str, label: str,
               judged: bool) -> list[Target]:
    """Rows comparing configuration ``k`` with the server without a connector.

    The ratio judged is the median of the paired (same-round) ratios, with its 95% interval;
    the ratio of the two servers' medians is shown beside it.
    """
    b, bn, m, mn = best[k], best["none"], med[k], med["none"]

    def row(what: str, key: str, unit: str, higher_is_better: bool, target: bool) -> Target:
        pairs = paired[k].get(key, [])
        of_medians = m[key] / mn[key]
        if pairs:
            ratio = median(pairs)
            low, high = median_interval(pairs)
            value = (f"{ratio:.3f} (95%: {low:.3f}-{high:.3f}, {len(pairs)} rounds; "
                     f"of medians {of_medians:.3f})")
        else:
            ratio, value = of_medians, f"{of_medians:.3f} (of medians)"
        ok = (ratio >= 0.97 if higher_is_better else ratio <= 1.03) if (judged and target) \
            else None
        shown_target = (">= 0.97" if higher_is_better else "<= 1.03") if ok is not None else "-"
        return Target(
            f"{what}, {label} / none (median of runs; best {b[key]:,.2f} / {bn[key]:,.2f})",
            f"{m[key]:,.2f} {unit}", f"{mn[key]:,.2f} {unit}", value, shown_target, ok,
        )

    return [
        row("request throughput", "request_throughput", "req/s", True, True),
        row("output token throughput", "output_throughput", "tok/s", True, True),
        row("median TTFT", "median_ttft_ms", "ms", False, True),
        row("server CPU time per request", "cpu_ms_per_request", "ms", False, False),
        row("decode alone, per token", "decode_ms", "ms", False, False),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
