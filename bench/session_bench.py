"""An agent session with every turn committed, against the same agent without a session.

    .venv/bin/python bench/session_bench.py [--preset tiny] [--turns 20]

One server with our connector. Two agents of the same shape, on different tokens, take turns
one after the other on it: each turn sends the whole history so far (the previous prompt, the
previous answer and a new 64-token message) as a completion of ``max_tokens=16``, greedy, timed
client-side. Agent S names a session (``kv_transfer_params: {"processfork": {"session": ...}}``),
so each of its turns is committed to ``sessions/...``; agent P does not. Reported: per-turn latency
(median of each agent's turns 2 to N; turn 1 computes everything for both), and the store's page
bytes that S's turns added, against the unique KV of S's last committed turn (its whole blocks'
pages). Checked: S's ref holds one snapshot per turn, chained by parent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH_DIR,
    Server,
    check,
    console,
    fresh_dir,
    median,
    model_path,
    ms,
    tokens,
    write_json,
)
from processfork.store import Store
from rich.table import Table

BLOCK = 32
MESSAGE = 64


def server_args() -> list[str]:
    return ["--dtype", "float32", "--max-model-len", "8192", "--max-num-batched-tokens", "2048",
            "--enable-prompt-tokens-details"]


def turn(srv: Server, history: list[int], session: str | None) -> tuple[float, list[int]]:
    body = {"model": srv.served_name, "prompt": history, "max_tokens": 16, "temperature": 0.0,
            "return_token_ids": True}
    if session is not None:
        body["kv_transfer_params"] = {"processfork": {"session": session}}
    seconds, out = srv.timed("/v1/completions", body)
    return seconds, list(out["choices"][0]["token_ids"])


def wait_for_turns(store: Path, ref: str, count: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        with Store(store, readonly=True) as st:
            cid = st.get_ref(ref)
            n = len(st.log(ref)) if cid else 0
        if n >= count:
            return
        check(time.monotonic() < deadline, f"{ref} holds {n} of {count} turns")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--turns", type=int, default=20)
    opts = parser.parse_args()
    store = fresh_dir(BENCH_DIR / "session" / "store")
    times: dict[str, list[float]] = {"session": [], "plain": []}
    with Server("session", model_path(opts.preset), "pf", store, server_args()) as srv:
        for i in range(2):
            srv.complete(tokens(910 + i, 64))
        page_bytes = srv.status()["engine"]["page_bytes"]
        before = srv.status()["store"]["page_bytes"]
        histories = {"session": tokens(100, 256), "plain": tokens(200, 256)}
        for t in range(opts.turns):
            for agent in ("session", "plain"):
                name = "bench-agent" if agent == "session" else None
                seconds, answer = turn(srv, histories[agent], name)
                times[agent].append(seconds)
                histories[agent] = histories[agent] + answer + tokens(1000 * t + len(agent), MESSAGE)
        ref = "sessions/bench-agent"
        wait_for_turns(store, ref, opts.turns)
        with Store(store, readonly=True) as st:
            entries = st.log(ref)
            last = st.get_snapshot(st.get_ref(ref))
            check(len(entries) == opts.turns, f"{len(entries)} snapshots for {opts.turns} turns")
            unique = 2 * len(last.sequences[0].pages) * page_bytes
        grown = srv.status()["store"]["page_bytes"] - before
    on, off = median(times["session"][1:]), median(times["plain"][1:])
    table = Table(title=f"{opts.turns}-turn agent, {opts.preset} model, 16 tokens a turn")
    for col in ("measure", "session", "no session", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("per-turn latency (median, turns 2+)", ms(on), ms(off), f"{on / off:.3f}")
    table.add_row("store page bytes added vs unique KV of the last turn", f"{grown:,}",
                  f"{unique:,}", f"{grown / unique:.3f}")
    console.print(table)
    write_json("session", {"preset": opts.preset, "turns": opts.turns, "times": times,
                           "grown_page_bytes": grown, "unique_kv_bytes": unique})


if __name__ == "__main__":
    main()
