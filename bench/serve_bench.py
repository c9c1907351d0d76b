"""Serving under load: what the plugin costs when nobody snapshots.

    .venv/bin/python bench/serve_bench.py [--quick] [--markdown]

Two servers from the same launcher plan, both up for the whole run: ``pf serve`` with our KV
connector, and the same plan minus ``--kv-transfer-config`` (no connector). Same model, dtype,
block size, KV cache size, prefix caching on, worker pinned to the same cores (the thread count
each worker really got is checked in its log).

Load: ``vllm bench serve`` (run as ``python -m processfork.plugin.launcher bench serve``, vLLM's
own CLI) with its ``prefix_repetition`` dataset: a few long shared prefixes, each followed by a
short unique suffix, all requests sent at once under a fixed concurrency, fixed output length
(``--ignore-eos``). Runs alternate between the two servers (A B B A ...) so that drift in the
machine's load hits both alike; each run starts from an empty prefix cache
(``/reset_prefix_cache``) and sends the same prompts (same seed). Reported: the median over runs
of request throughput, output token throughput and median / p99 TTFT, as ratios with/without.

Model: the tiny random Llama (2 layers). On 2 cores a run of a few hundred requests on it takes
seconds, so several alternating runs fit in minutes; and its steps are so short that the
connector's per-step and per-request Python work is the largest share it can ever be, so the
overhead measured here is an upper bound for larger models. Raw numbers: ``.bench/serve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
    model_path,
    targets_markdown,
    targets_table,
    write_json,
)

WORKLOAD = {
    "num_prefixes": 4,
    "prefix_len": 512,
    "suffix_len": 64,
    "output_len": 32,
    "max_concurrency": 8,
}


def bench_serve(srv: Server, model: Path, num_prompts: int, out: Path, seed: int) -> dict:
    """One ``vllm bench serve`` run; returns its result JSON."""
    w = WORKLOAD
    cmd = [
        sys.executable, "-m", "processfork.plugin.launcher", "bench", "serve",
        "--backend", "openai", "--base-url", srv.base_url, "--endpoint", "/v1/completions",
        "--model", srv.served_name, "--tokenizer", str(model),
        "--dataset-name", "prefix_repetition",
        "--prefix-repetition-num-prefixes", str(w["num_prefixes"]),
        "--prefix-repetition-prefix-len", str(w["prefix_len"]),
        "--prefix-repetition-suffix-len", str(w["suffix_len"]),
        "--prefix-repetition-output-len", str(w["output_len"]),
        "--num-prompts", str(num_prompts), "--max-concurrency", str(w["max_concurrency"]),
        "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--disable-tqdm", "--save-result", "--result-dir", str(out.parent),
        "--result-filename", out.name,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"vllm bench serve failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    check(result.get("completed") == num_prompts,
          f"{srv.name}: {result.get('completed')} of {num_prompts} requests completed")
    return result


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and runs")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument("--rounds", type=int, default=None, help="runs per server")
    opts = parser.parse_args()

    num_prompts = 64 if opts.quick else 128
    rounds = opts.rounds or (2 if opts.quick else 8)
    model = model_path("tiny")
    args = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes", "512M"]
    root = fresh_dir(BENCH_DIR / "serve")
    servers = {
        "with": Server("serve-with-connector", model, "pf", root / "store", args,
                       served_name="tiny"),
        "without": Server("serve-without-connector", model, "plain", root / "unused", args,
                          served_name="tiny"),
    }
    runs: dict[str, list[dict]] = {"with": [], "without": []}
    threads = {}
    try:
        for srv in servers.values():
            srv.start()
        threads = {k: s.threads() for k, s in servers.items()}
        check(len(set(threads.values())) == 1, f"thread counts differ: {threads}")
        order = ["with", "without"]
        for k in order:  # warm-up run, discarded
            servers[k].reset_prefix_cache()
            bench_serve(servers[k], model, num_prompts // 4, root / f"warmup-{k}.json", 1)
        for r in range(rounds):
            for k in (order if r % 2 == 0 else order[::-1]):
                servers[k].reset_prefix_cache()
                cpu0 = group_cpu_seconds(servers[k])
                result = bench_serve(servers[k], model, num_prompts, root / f"{k}-{r}.json", 0)
                cpu = group_cpu_seconds(servers[k]) - cpu0
                runs[k].append({**{key: result[key] for key in KEYS},
                                "cpu_ms_per_request": cpu * 1000 / num_prompts})
                console.log(f"{k} connector, run {r}: "
                            f"{result['request_throughput']:.2f} req/s, "
                            f"median TTFT {result['median_ttft_ms']:.1f} ms")
    finally:
        for srv in servers.values():
            srv.stop()

    med = {k: {key: median(run[key] for run in v) for key in (*KEYS, "cpu_ms_per_request")}
           for k, v in runs.items()}
    w, wo = med["with"], med["without"]
    targets = [
        Target("request throughput, with / without connector",
               f"{w['request_throughput']:.2f} req/s", f"{wo['request_throughput']:.2f} req/s",
               f"{w['request_throughput'] / wo['request_throughput']:.3f}", ">= 0.97",
               w["request_throughput"] >= 0.97 * wo["request_throughput"]),
        Target("output token throughput, with / without",
               f"{w['output_throughput']:.1f} tok/s", f"{wo['output_throughput']:.1f} tok/s",
               f"{w['output_throughput'] / wo['output_throughput']:.3f}", ">= 0.97",
               w["output_throughput"] >= 0.97 * wo["output_throughput"]),
        Target("median TTFT, with / without", f"{w['median_ttft_ms']:.1f} ms",
               f"{wo['median_ttft_ms']:.1f} ms",
               f"{w['median_ttft_ms'] / wo['median_ttft_ms']:.3f}", "<= 1.03",
               w["median_ttft_ms"] <= 1.03 * wo["median_ttft_ms"]),
        Target("p99 TTFT, with / without", f"{w['p99_ttft_ms']:.1f} ms",
               f"{wo['p99_ttft_ms']:.1f} ms", f"{w['p99_ttft_ms'] / wo['p99_ttft_ms']:.3f}", "-",
               None),
        Target("server CPU time per request, with / without",
               f"{w['cpu_ms_per_request']:.1f} ms", f"{wo['cpu_ms_per_request']:.1f} ms",
               f"{w['cpu_ms_per_request'] / wo['cpu_ms_per_request']:.3f}", "-", None),
        Target("median TPOT, with / without", f"{w['median_tpot_ms']:.2f} ms",
               f"{wo['median_tpot_ms']:.2f} ms",
               f"{w['median_tpot_ms'] / wo['median_tpot_ms']:.3f}", "-", None),
    ]
    wl = WORKLOAD
    title = (f"Serving, tiny model: {num_prompts} requests x {rounds} runs per server, "
             f"{wl['num_prefixes']} shared prefixes of {wl['prefix_len']} + {wl['suffix_len']} "
             f"unique tokens, {wl['output_len']} output tokens, concurrency "
             f"{wl['max_concurrency']}; worker threads {threads.get('with')}")
    console.print(targets_table(title, targets))
    if opts.markdown:
        print(targets_markdown(targets))
    write_json("serve", {"workload": WORKLOAD, "num_prompts": num_prompts, "rounds": rounds,
                         "threads": threads, "runs": runs, "median": med, "targets": targets})
    ok = all(t.ok is not False for t in targets)
    return 0 if ok or opts.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
