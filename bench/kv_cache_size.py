"""The KV cache a sliding-window model gets, with our connector and without.

    .venv/bin/python bench/kv_cache_size.py [--markdown]

vLLM turns its hybrid KV cache manager off when a configured KV connector does not declare
``SupportsHMA``; a model with sliding-window layers then keeps every block of every layer, and
the same memory holds fewer tokens. Three servers of the ``sliding`` model preset (sliding-window
layers interleaved with full-attention layers), each started alone from the same launcher plan
with the same KV cache memory: without a connector, with ours, and with vLLM's no-op connector
(``noop_connector.py``, which does not declare it: what any such connector costs, ours included
before it declared it). Reported: the token capacity each engine logs at start ("KV cache size:
N tokens"), its KV-cache groups, and whether it logged turning the hybrid manager off. Fails
unless ours reports what the server without a connector reports. Raw numbers:
``.bench/kv_cache_size.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH_DIR,
    Server,
    check,
    console,
    fresh_dir,
    markdown_table,
    model_path,
    write_json,
)
from rich.table import Table

ARGS = ["--dtype", "float32", "--max-model-len", "4096", "--kv-cache-memory-bytes", "256M"]
CAPACITY = re.compile(r"KV cache size: ([\d,]+) tokens")
GROUP_SIZES = re.compile(r"kv cache group sizes \(([^)]*)\)")
HMA_OFF = "Turning off hybrid kv cache manager"


def _servers(model: Path, root: Path) -> dict[str, Server]:
    noop = json.dumps({"kv_connector": "NoopConnector", "kv_connector_module_path":
                       "noop_connector", "kv_role": "kv_both"}, separators=(",", ":"))
    return {
        "without a connector": Server("kvsize-none", model, "plain", root / "unused", ARGS,
                                      served_name="sliding"),
        "with our connector": Server("kvsize-ours", model, "pf", root / "store", ARGS,
                                     served_name="sliding"),
        "with vLLM's no-op connector (no SupportsHMA)": Server(
            "kvsize-noop", model, "custom", root / "unused-noop",
            [*ARGS, "--kv-transfer-config", noop], served_name="sliding",
            env={"PYTHONPATH": str(Path(__file__).resolve().parent)}),
    }


def cache_report(server: Server) -> dict[str, object]:
    assert server.process is not None and server.process.log_path is not None
    text = server.process.log_path.read_text(errors="replace")
    found = CAPACITY.findall(text)
    check(bool(found), f"{server.name} logged its KV cache size")
    groups = GROUP_SIZES.findall(text)
    return {"tokens": int(found[-1].replace(",", "")), "hma_off": HMA_OFF in text,
            "groups": len(groups[-1].split(",")) if groups else 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    opts = parser.parse_args()
    model = model_path("sliding")
    root = fresh_dir(BENCH_DIR / "kv-cache-size")
    results: dict[str, dict[str, object]] = {}
    for label, server in _servers(model, root).items():
        with server:
            results[label] = cache_report(server)
    rows = [[label, f"{r['tokens']:,}", str(r["groups"]), "off" if r["hma_off"] else "on"]
            for label, r in results.items()]
    headers = ["Server", "KV cache size (tokens)", "KV-cache groups", "hybrid manager"]
    if opts.markdown:
        print(markdown_table(headers, rows))
    else:
        table = Table(*headers, title="sliding model, 256 MiB of KV cache")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    write_json("kv_cache_size", {"args": ARGS, "results": results})
    ours, none = results["with our connector"], results["without a connector"]
    check(ours["tokens"] == none["tokens"] and not ours["hma_off"],
          "our connector leaves the KV cache as large as without a connector")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
