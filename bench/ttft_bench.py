"""Time to first token: cold recompute, vLLM's ExampleConnector, our checkout, a warm prefix hit.

    .venv/bin/python bench/ttft_bench.py [--quick] [--markdown]

For each prompt length (1K, 4K, 16K tokens; ``--quick``: 1K and 4K on the tiny model), all
timed client-side over HTTP, greedy, ``max_tokens=1``:

(a) cold recompute: a prompt the engine has never seen (repetitions after ``/reset_prefix_cache``);
(b) vLLM's ``ExampleConnector`` loading the prompt's KV from its disk folder. Its server runs with
    prefix caching off, so every repetition really loads from disk; the load is checked in
    ``/metrics`` (external prompt tokens);
(c) our checkout with a cold cache: the prompt is snapshotted, the server restarted, then
    ``POST /v1/processfork/checkout`` runs one engine pass that loads the pages and computes the
    first token (further repetitions after ``/reset_prefix_cache``). Checked: every loadable
    token was loaded and none was already resident;
(d) a warm prefix-cache hit of the same prompt in the same engine;
(e) one numpy memcpy of the prompt's KV bytes (prompt tokens x KV bytes per token).

Every server has the same model, dtype, block size, KV cache size, scheduler budget (no chunked
prefill at these lengths, which ExampleConnector needs to save a prompt whole) and worker
threads. The greedy first token must agree across (a), (b), (d) and the completion sent after a
checkout. Raw numbers: ``.bench/ttft.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH_DIR,
    PF,
    Server,
    Target,
    check,
    console,
    first_token,
    fresh_dir,
    kv_bytes_per_token,
    markdown_table,
    median,
    memcpy_seconds,
    model_path,
    ms,
    targets_markdown,
    targets_table,
    tokens,
    write_json,
)
from rich.table import Table

BLOCK = 32


def server_args(max_len: int) -> list[str]:
    return [
        "--dtype", "float32",
        "--max-model-len", str(max_len + 64),
        "--max-num-batched-tokens", str(max_len),
        "--enable-prompt-tokens-details",
    ]


def loadable(n: int) -> int:
    """Tokens a prefix hit or a load can cover: whole blocks, leaving one token to compute."""
    return (n - 1) // BLOCK * BLOCK


def cached_tokens(completion: dict) -> int:
    details = completion["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def run_ours(model: Path, lengths: list[int], prompts: dict[int, list[int]], reps: int,
             cold_reps: dict[int, int], args: list[str], extra: dict) -> dict:
    out: dict = {L: {"a": [], "c": [], "c_server_ms": [], "d": [], "after_checkout": [],
                     "snapshot": None, "tokens": {}} for L in lengths}
    store = fresh_dir(BENCH_DIR / "ttft" / "store")
    with Server("ttft-pf", model, "pf", store, args, connector_extra=extra) as srv:
        for i in range(2):
            srv.complete(tokens(900 + i, 64))
        cids = {}
        for L in lengths:
            for r in range(cold_reps[L]):
                if r:
                    srv.reset_prefix_cache()
                t, comp = srv.complete(prompts[L])
                check(cached_tokens(comp) == 0, f"cold run of {L} tokens hit the prefix cache")
                out[L]["a"].append(t)
                out[L]["tokens"]["a"] = first_token(comp)
            t, snap = srv.timed(f"{PF}/snapshot", {"name": f"ttft-{L}", "token_ids": prompts[L]})
            out[L]["snapshot"] = {"seconds": t, **snap}
            cids[L] = snap["cid"]
        srv.restart()  # cold engine: nothing of the prompts is resident
        for i in range(2):
            srv.complete(tokens(910 + i, 64))  # first requests after a start pay one-time costs
        for L in lengths:
            for r in range(reps):
                if r:
                    srv.reset_prefix_cache()
                t, co = srv.timed(f"{PF}/checkout", {"cid": cids[L]})
                check(co["tokens_loaded"] == loadable(L) and co["tokens_already_resident"] == 0,
                      f"checkout of {L} tokens loaded {co['tokens_loaded']} "
                      f"(resident {co['tokens_already_resident']}), expected {loadable(L)}")
                out[L]["c"].append(t)
                out[L]["c_server_ms"].append(co["ms"])
                t, comp = srv.complete(prompts[L])
                check(cached_tokens(comp) == loadable(L), "completion after checkout missed")
                out[L]["after_checkout"].append(t)
                out[L]["tokens"]["after_checkout"] = first_token(comp)
                for _ in range(2):
                    t, comp = srv.complete(prompts[L])
                    out[L]["d"].append(t)
                out[L]["tokens"]["d"] = first_token(comp)
        out["threads"] = srv.threads()
    return out


def run_example(model: Path, lengths: list[int], prompts: dict[int, list[int]], reps: int,
                args: list[str]) -> dict:
    out: dict = {L: {"save": None, "b": [], "tokens": {}} for L in lengths}
    folder = fresh_dir(BENCH_DIR / "ttft" / "example")
    with Server("ttft-example", model, "example", folder, args) as srv:
        for i in range(2):
            srv.complete(tokens(900 + i, 64))
        external = 'vllm:prompt_tokens_by_source_total'
        for L in lengths:
            t, _ = srv.complete(prompts[L])  # computes and saves the prompt
            out[L]["save"] = t
            for _ in range(reps):
                before = srv.metric(external, source="external_kv_transfer")
                t, comp = srv.complete(prompts[L])
                loaded = srv.metric(external, source="external_kv_transfer") - before
                check(loaded == loadable(L),
                      f"ExampleConnector loaded {loaded} of {loadable(L)} tokens for {L}")
                check(cached_tokens(comp) == loadable(L), "ExampleConnector load not reported")
                out[L]["b"].append(t)
                out[L]["tokens"]["b"] = first_token(comp)
        out["threads"] = srv.threads()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1K and 4K tokens")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of (b), (c), (d)")
    parser.add_argument("--lengths", default=None, help="comma-separated prompt lengths")
    parser.add_argument("--preset", default=None, help="model preset (default: bench; quick: tiny)")
    parser.add_argument("--staged-loads", action="store_true",
                        help="our connector loads through a staging tensor (for comparison)")
    opts = parser.parse_args()

    preset = opts.preset or ("tiny" if opts.quick else "bench")
    lengths = [1024, 4096] if opts.quick else [1024, 4096, 16384]
    if opts.lengths:
        lengths = [int(x) for x in opts.lengths.split(",")]
    reps = opts.reps or 5
    cold_reps = {L: (1 if L > 4096 else 2) for L in lengths}
    model = model_path(preset)
    args = server_args(max(lengths))
    prompts = {L: tokens(L, L) for L in lengths}
    kvpt = kv_bytes_per_token(preset)

    extra = {"pipelined_loads": False} if opts.staged_loads else {}
    ours = run_ours(model, lengths, prompts, reps, cold_reps, args, extra)
    example = run_example(model, lengths, prompts, reps, args)
    memcpy = {L: memcpy_seconds(L * kvpt) for L in lengths}
    check(ours["threads"] == example["threads"], "servers ran with different thread counts")

    timings = Table(title=f"TTFT, {preset} model ({kvpt // 1024} KiB of KV per token), "
                          f"median of {reps} (cold: {cold_reps})")
    headers = ("Prompt tokens", "(a) cold recompute", "(b) ExampleConnector load",
               "(c) our checkout", "(d) warm prefix hit", "(e) memcpy of the KV",
               "checkout, then a completion")
    for h in headers:
        timings.add_column(h, justify="right")
    rows, targets = [], []
    for L in lengths:
        a, b, c = median(ours[L]["a"]), median(example[L]["b"]), median(ours[L]["c"])
        d, e = median(ours[L]["d"]), memcpy[L]
        after = median(x + y for x, y in zip(ours[L]["c"], ours[L]["after_checkout"]))
        toks = {**ours[L]["tokens"], **example[L]["tokens"]}
        check(len(set(toks.values())) == 1, f"first tokens differ at {L}: {toks}")
        row = (f"{L:,}", ms(a), ms(b), ms(c), ms(d), ms(e), ms(after))
        rows.append(row)
        timings.add_row(*row)
        kib = f"{L:,} tokens"
        targets += [
            Target(f"{kib}: (c) checkout vs (b) ExampleConnector", ms(c), ms(b),
                   f"{c / b:.2f}", "<= 1.0", c <= b),
            Target(f"{kib}: (c) checkout vs (d) warm prefix hit", ms(c), ms(d),
                   f"{c / d:.2f}", "<= 1.1", c <= 1.1 * d),
            Target(f"{kib}: restore overhead (c)-(d) vs (e) memcpy", ms(c - d), ms(e),
                   f"{(c - d) / e:.2f}", "<= 2.0", c - d <= 2 * e),
            Target(f"{kib}: speedup (a) cold / (c) checkout", ms(a), ms(c),
                   f"{a / c:.1f}x", "-", None),
        ]
    console.print(timings)
    console.print(targets_table("TTFT targets", targets))
    if opts.markdown:
        print(markdown_table(headers, rows))
        print()
        print(targets_markdown(targets))
    write_json("ttft", {
        "preset": preset, "kv_bytes_per_token": kvpt, "reps": reps, "cold_reps": cold_reps,
        "ours": {str(k): v for k, v in ours.items()},
        "example": {str(k): v for k, v in example.items()},
        "memcpy_seconds": {str(k): v for k, v in memcpy.items()},
        "targets": targets,
    })
    # Quick runs use the tiny model, whose KV is too small for memory-bandwidth ratios to mean
    # much: they check that everything works and print the ratios, but never fail on them.
    return 0 if opts.quick or all(t.ok is not False for t in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
