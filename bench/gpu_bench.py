"""Checkout vs recompute vs vLLM's own connectors on a CUDA GPU, measured side by side.

    python3 bench/gpu_bench.py --part ours    # (a) (c) (d) (e), snapshot and checkout GB/s
    python3 bench/gpu_bench.py --part checkouts   # (c) again, in a fresh engine, from that store
    python3 bench/gpu_bench.py --part unverified  # (c) with verify_loads off: what the check costs
    python3 bench/gpu_bench.py --part per-page    # (c) with a Python call per page (no C reader)
    python3 bench/gpu_bench.py --part pread       # (c) with pages read by pread, not from the map
    python3 bench/gpu_bench.py --part peers   # (b) ExampleConnector, (b2) OffloadingConnector
    python3 bench/gpu_bench.py --part report  # the tables, from the JSON the parts wrote
    python3 bench/gpu_bench.py --quick        # smoke run of every part (tiny model; CPU works)
    python3 bench/gpu_bench.py --part ours --lengths 32768   # one length only (a few minutes)

Model: Llama-3-8B's shape (32 layers, 8 KV heads of 128: 128 KiB of KV per token in bf16) with
random weights (``--load-format dummy``, config and tokenizer from the model builder, no
download). Every server: bf16, vLLM's default block size (16), ``--enforce-eager``, one step
budget that prefills every prompt in one pass, ``VLLM_SERVER_DEV_MODE=1`` for
``/reset_prefix_cache``. All times are client-side over HTTP, greedy, ``max_tokens=1``:

(a) cold recompute: a prompt the engine has not cached;
(b) vLLM's ``ExampleConnector`` loading the prompt's KV from its files (prefix caching off, so
    every repetition loads; the files sit in the page cache);
(b2) vLLM's ``OffloadingConnector`` (``--kv-offloading-size``) loading it from its CPU-memory
    tier after ``/reset_prefix_cache`` emptied the GPU cache;
(c) our checkout (``POST /v1/processfork/checkout``: load the pages, compute the last block,
    sample the first token) in a freshly started engine, further repetitions after
    ``/reset_prefix_cache``; the store's pages sit in the page cache;
(c*) the same checkout with the host tier (``--host-tier-gib``): the snapshots left their pages
    in it, and the fresh engine copies them to the GPU from there instead of the store;
(d) a warm prefix-cache hit of the same prompt in the same engine;
(e) one pinned host-to-device copy of the prompt's KV bytes (CUDA events, best of 5).

Also: a snapshot of a resident context (no forward pass) in GB/s against a pinned device-to-host
copy, into an empty and into a warm store (every page present: the same context snapshotted
again, whose blocks the engine names from memory, ``reused_pages``), and the checkout's restore
rate (bytes over (c) - (d)) against (e). Raw numbers: ``$PF_BENCH_DIR`` (default ``.bench/gpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import check, first_token, median

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("PF_BENCH_DIR", REPO / ".bench" / "gpu"))
WORK = Path(os.environ.get("PF_BENCH_WORK", "/tmp/pf-gpu-bench"))
PF = "/v1/processfork"
GiB = 1 << 30


def log(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# -- setup ---------------------------------------------------------------------------------------
class Setup:
    """What every server of the run shares, decided once."""

    def __init__(self, quick: bool, tier_gib: int = 0, tier_dir: str = "/dev/shm",
                 lengths: list[int] | None = None, trace: bool = False):
        from processfork_dev.model_builder import CONFIG_ONLY, PRESETS, build_model

        self.quick, self.trace = quick, trace
        self.tier_gib, self.tier_dir = tier_gib, tier_dir
        self.cuda = _cuda()
        preset = "tiny" if quick else "llama3-8b"
        spec = PRESETS[preset]
        if quick and self.cuda:
            from dataclasses import replace

            spec = replace(spec, dtype="bfloat16")
        self.spec = spec
        self.model = build_model(WORK / "models" / f"{preset}-{spec.dtype}", spec,
                                 weights=preset not in CONFIG_ONLY)
        self.lengths = lengths or ([1024, 2048] if quick else [8192, 32768, 131072])
        self.block = 16 if self.cuda else 32
        self.kv_per_token = spec.kv_bytes_per_token()
        max_len = max(self.lengths) + 64
        args = ["--dtype", spec.dtype, "--max-model-len", str(max_len),
                "--max-num-batched-tokens", str(max_len), "--enable-prompt-tokens-details"]
        if preset in CONFIG_ONLY:
            args += ["--load-format", "dummy"]
        if self.cuda:
            args += ["--enforce-eager", "--gpu-memory-utilization", "0.2" if quick else "0.6"]
        self.args = args

    def kv_bytes(self, length: int) -> int:
        return length * self.kv_per_token

    def prompt(self, length: int, salt: int = 0) -> list[int]:
        import random

        rng = random.Random(length * 7 + salt)
        return [rng.randrange(10, self.spec.vocab) for _ in range(length)]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class Server:
    """A ``pf serve`` (our connector), or vLLM with another ``--kv-transfer-config``."""

    def __init__(self, setup: Setup, name: str, *, store: Path, extra: list[str] | None = None,
                 ours: bool = True, env: dict[str, str] | None = None):
        self.setup, self.name, self.store = setup, name, store
        self.env = {"VLLM_SERVER_DEV_MODE": "1", **(env or {})}
        if setup.trace and ours:
            self.env["PROCESSFORK_TRACE"] = "1"  # plugin/trace.py: each checkout's phases
        self.extra = extra or []
        self.ours = ours
        self.process = None
        self.client: httpx.Client | None = None
        self.starts = 0

    def start(self) -> Server:
        from processfork.plugin.server_process import launch_server

        self.starts += 1
        t = time.perf_counter()
        # A log of this name from an earlier run would add its marks to this run's (--trace).
        (WORK / "logs" / f"{self.name}-{self.starts}.log").unlink(missing_ok=True)
        self.process = launch_server(
            self.setup.model, store=self.store,
            extra_args=["--served-model-name", "bench", *self.setup.args, *self.extra],
            env=self.env,
            log_path=WORK / "logs" / f"{self.name}-{self.starts}.log",
        )
        self.process.wait_ready(900)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.process.port}",
                                   timeout=900.0, trust_env=False)
        log(f"{self.name}: ready in {time.perf_counter() - t:.0f} s")
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.process is not None:
            self.process.stop()

    def restart(self) -> Server:
        self.stop()
        return self.start()

    def report_trace(self, key: str) -> None:
        """With ``--trace``: the phases of this server's checkouts (bench/trace_phases.py),
        printed and written to ``trace-KEY.json`` beside the results."""
        if not self.setup.trace or self.process is None:
            return
        from trace_phases import KINDS, parse, phases, print_table

        jobs = parse(Path(self.process.log_path).read_text(errors="replace"))
        found = {kind: phases(jobs, kind) for kind in KINDS}
        for kind, by_length in found.items():
            if by_length:
                print_table(by_length, kind, f"{kind.capitalize()} phases, {key} (median ms)")
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"trace-{key}.json").write_text(json.dumps(
            {kind: {str(n): v[n] for n in sorted(v)} for kind, v in found.items()}, indent=2)
            + "\n")

    def post(self, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        assert self.client is not None
        t = time.perf_counter()
        response = self.client.post(path, json=body)
        elapsed = time.perf_counter() - t
        if response.status_code != 200:
            raise SystemExit(f"{self.name}: POST {path} -> {response.status_code}: "
                             f"{response.text[:800]}")
        return elapsed, response.json()

    def complete(self, prompt: list[int]) -> tuple[float, dict[str, Any]]:
        return self.post("/v1/completions", {
            "model": "bench", "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
            "return_token_ids": True,
        })

    def reset(self) -> None:
        assert self.client is not None
        for _ in range(100):
            r = self.client.post("/reset_prefix_cache")
            if r.status_code == 200 and r.json().get("success", True):
                return
            time.sleep(0.1)
        raise SystemExit(f"{self.name}: /reset_prefix_cache failed: {r.status_code} {r.text}")

    def metrics(self) -> str:
        assert self.client is not None
        return self.client.get("/metrics").text


def cached(completion: dict[str, Any]) -> int:
    details = completion["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def save(name: str, data: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    log(f"wrote {OUT / f'{name}.json'}")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        import torch
        import vllm

        info["vllm"] = vllm.__version__
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


# -- (e): bare copies ----------------------------------------------------------------------------
def copy_seconds(nbytes: int, cuda: bool) -> dict[str, float]:
    """Best of 5 pinned host->device and device->host copies of ``nbytes`` (CUDA events)."""
    import torch

    if not cuda:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        best = min(_host_time(lambda: dst.copy_(src)) for _ in range(5))
        return {"h2d": best, "d2h": best}
    host = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items():
        times = []
        for _ in range(6):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        out[name] = min(times[1:])
    del host, dev
    torch.cuda.empty_cache()
    return out


def _host_time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- parts ---------------------------------------------------------------------------------------
def part_ours(setup: Setup) -> None:
    copies = {n: copy_seconds(setup.kv_bytes(n), setup.cuda) for n in setup.lengths}
    for n, c in copies.items():
        log(f"{n} tokens: {setup.kv_bytes(n) / GiB:.2f} GiB, pinned H2D {c['h2d'] * 1e3:.1f} ms, "
            f"D2H {c['d2h'] * 1e3:.1f} ms")
    store = WORK / "store"
    shutil.rmtree(store, ignore_errors=True)
    extra: list[str] = []
    if setup.tier_gib:
        for old in Path(setup.tier_dir).glob("processfork-tier-*"):
            old.unlink()  # an earlier run's pages: this run fills its own
        from processfork.plugin.launch_plan import kv_transfer_config

        config = kv_transfer_config(store)
        config["kv_connector_extra_config"].update({
            "host_tier_mib": setup.tier_gib * 1024, "host_tier_dir": setup.tier_dir,
            "page_path": "staged"})
        extra = ["--kv-transfer-config", json.dumps(config)]
    checkout_key = "checkout_tier" if setup.tier_gib else "checkout"
    srv = Server(setup, "ours", store=store, extra=extra).start()
    log("ours:", _page_path_line(srv))
    res: dict[int, dict[str, Any]] = {}
    try:
        for n in setup.lengths:
            prompt = setup.prompt(n)
            r: dict[str, Any] = {"cold": [], "warm": [], "kv_bytes": setup.kv_bytes(n)}
            for rep in range(1 if n > 65536 else 2):
                if rep:
                    srv.reset()
                t, out = srv.complete(prompt)
                check(cached(out) == 0, f"{n}: cold request hit the cache")
                r["cold"].append(t)
                r["token"] = first_token(out)
            for _ in range(3):
                t, out = srv.complete(prompt)
                check(cached(out) == (n - 1) // setup.block * setup.block, f"{n}: warm miss")
                check(first_token(out) == r["token"], f"{n}: warm token differs")
                r["warm"].append(t)
            t, snap = srv.post(f"{PF}/snapshot", {"name": f"bench/{n}", "token_ids": prompt})
            check(snap["num_tokens"] == n, f"{n}: snapshot holds {snap['num_tokens']} tokens")
            r["snapshot"], r["snapshot_new_pages"] = t, snap["new_pages"]
            warm_store = []
            for rep in range(3):  # one sample swung by 40% between runs: the median of three
                t, again = srv.post(f"{PF}/snapshot",
                                    {"name": f"bench/{n}-again{rep}", "token_ids": prompt})
                check(again["new_pages"] == 0, f"{n}: warm-store snapshot wrote pages")
                warm_store.append(t)
            r["snapshot_warm_store_all"] = warm_store
            t = r["snapshot_warm_store"] = median(warm_store)
            # Blocks the engine named from memory (it saved them in the snapshot before).
            r["snapshot_warm_store_reused"] = again.get("reused_pages", 0)
            log(f"{n}: cold {median(r['cold']) * 1e3:.0f} ms, warm {median(r['warm']) * 1e3:.0f} ms,"
                f" snapshot {t * 1e3:.0f} ms (warm store, {r['snapshot_warm_store_reused']} of "
                f"{snap['num_pages']} blocks named from memory) / {r['snapshot'] * 1e3:.0f} ms")
            res[n] = r
        srv.report_trace("snapshots")
        srv.restart()  # a fresh engine: the GPU cache is empty; the store is in the page cache
        if setup.tier_gib:
            log("ours:", _page_path_line(srv, "host tier"))
        for n in setup.lengths:
            prompt, r = setup.prompt(n), res[n]
            r[checkout_key] = timed_checkouts(srv, setup, n)
            _, out = srv.complete(prompt)
            check(first_token(out) == r["token"], f"{n}: token after checkout differs from cold")
            log(f"{n}: {checkout_key} {[round(x * 1e3) for x in r[checkout_key]]} ms")
        srv.report_trace(checkout_key)
    finally:
        srv.stop()
    save("ours", {"copies": copies, "results": res, "args": setup.args})


def timed_checkouts(srv: Server, setup: Setup, n: int, reps: int = 5) -> list[float]:
    """``POST /checkout`` of ``bench/<n>``: first in the engine as it is (a fresh one), then
    after ``/reset_prefix_cache``; each must load every loadable token. The first can be the
    fresh engine's first request and pays once for what the later ones find ready, so the median
    of five is what a checkout costs in a running server; the first is reported beside it."""
    times = []
    for rep in range(reps):
        if rep:
            srv.reset()
        t, out = srv.post(f"{PF}/checkout", {"cid": f"bench/{n}"})
        check(out["tokens_loaded"] == (n - 1) // setup.block * setup.block,
              f"{n}: checkout loaded {out['tokens_loaded']} tokens")
        times.append(t)
    return times


def part_checkouts(setup: Setup, *, verify: bool, native: bool = True,
                   reader: str | None = None, config_extra: dict[str, Any] | None = None,
                   name: str | None = None) -> None:
    """(c) again in a freshly started engine, from the store ``--part ours`` left; with
    ``verify=False`` (``verify_loads: false``) it shows what the integrity check costs, with
    ``native=False`` (``PROCESSFORK_NATIVE_PAGES=0``) what the compiled page reader is worth,
    with ``reader`` (``page_reader``) another way of taking pages from the store, with
    ``config_extra`` any other connector settings (results under ``checkout_<name>``)."""
    from processfork.plugin.launch_plan import kv_transfer_config

    store = WORK / "store"
    config = kv_transfer_config(store)
    config["kv_connector_extra_config"]["verify_loads"] = verify
    key = "checkout" if verify else "checkout_unverified"
    if not native:
        key += "_per_page"
    if reader is not None:
        config["kv_connector_extra_config"]["page_reader"] = reader
        key += f"_{reader}"
    if config_extra:
        config["kv_connector_extra_config"].update(config_extra)
        key += f"_{name or 'config'}"
    srv = Server(setup, key, store=store, extra=["--kv-transfer-config", json.dumps(config)],
                 env=None if native else {"PROCESSFORK_NATIVE_PAGES": "0"}).start()
    path = OUT / "ours.json"
    data = json.loads(path.read_text()) if path.exists() else {"results": {}}
    try:
        for n in setup.lengths:
            times = timed_checkouts(srv, setup, n)
            data["results"].setdefault(str(n), {})[key] = times
            log(f"{n}: {key} {[round(x * 1e3) for x in times]} ms")
        srv.report_trace(key)
    finally:
        srv.stop()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _page_path_line(srv: Server, containing: str = "processfork:") -> str:
    text = Path(srv.process.log_path).read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if "processfork:" in ln and containing in ln]
    return lines[-1][-160:] if lines else "(no processfork line in the log)"


def offloading_args(setup: Setup) -> list[str]:
    size = max(8, int(1.5 * setup.kv_bytes(max(setup.lengths)) / GiB) + 1)
    # The connector config is given whole: otherwise pf serve's own would be merged into it.
    config = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"cpu_bytes_to_use": size * GiB}}
    return ["--kv-offloading-size", str(size), "--kv-transfer-config", json.dumps(config)]


def part_peers(setup: Setup, only_offloading: bool = False) -> None:
    res: dict[str, dict[int, dict[str, Any]]] = {"example": {}, "offloading": {}}
    shutil.rmtree(WORK / "store", ignore_errors=True)  # ours is done: free its disk
    if only_offloading:
        return _offloading(setup, res)
    files = WORK / "example-kv"
    shutil.rmtree(files, ignore_errors=True)
    example = json.dumps({"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                          "kv_connector_extra_config": {"shared_storage_path": str(files)}})
    srv = Server(setup, "example", store=WORK / "unused-store",
                 extra=["--kv-transfer-config", example, "--no-enable-prefix-caching"]).start()
    try:
        for n in setup.lengths:
            prompt = setup.prompt(n)
            _, first = srv.complete(prompt)  # computes and saves
            times = []
            for _ in range(2 if n > 65536 else 3):
                t, out = srv.complete(prompt)
                check(first_token(out) == first_token(first), f"example {n}: token differs")
                times.append(t)
            res["example"][n] = {"load": times}
            log(f"example {n}: {[round(x * 1e3) for x in times]} ms")
    finally:
        srv.stop()
        shutil.rmtree(files, ignore_errors=True)
    save("peers", {"results": res, "args": setup.args})
    _offloading(setup, res)


def _offloading(setup: Setup, res: dict[str, Any]) -> None:
    if not setup.cuda:
        log("offloading: vLLM's CPU-memory tier needs a GPU; skipped")
        save("peers", {"results": res, "args": setup.args})
        return
    srv = Server(setup, "offloading", store=WORK / "unused-store",
                 extra=offloading_args(setup)).start()
    try:
        for n in setup.lengths:
            prompt = setup.prompt(n)
            _, first = srv.complete(prompt)  # computes; the blocks are offloaded as they fill
            times, hits = [], []
            for _ in range(3):
                time.sleep(0.5)  # let the offload of the last blocks finish
                srv.reset()
                t, out = srv.complete(prompt)
                check(first_token(out) == first_token(first), f"offloading {n}: token differs")
                times.append(t)
                hits.append(cached(out))
            res["offloading"][n] = {"load": times, "cached_tokens": hits}
            log(f"offloading {n}: {[round(x * 1e3) for x in times]} ms, cached {hits}")
    finally:
        srv.stop()
    save("peers", {"results": res, "args": setup.args})


# -- report --------------------------------------------------------------------------------------
def part_report(setup: Setup) -> None:
    from rich.console import Console
    from rich.table import Table

    ours = json.loads((OUT / "ours.json").read_text())
    peers_path = OUT / "peers.json"
    peers = json.loads(peers_path.read_text())["results"] if peers_path.exists() else {}
    console = Console(width=200)
    ttft = Table(title=f"TTFT, {ours['machine'].get('gpu', 'CPU')}, vLLM "
                       f"{ours['machine'].get('vllm')} (median; ms)")
    for col in ("tokens", "GiB", "(a) cold", "(b) Example", "(b2) Offload", "(c) checkout",
                "(c) first", "(c-) per-page", "(cp) pread", "(c*) tier", "(c') unverified", "(d) warm",
                "(e) H2D", "a/c", "c/b", "c/b2", "(c-d)/e", "(c--d)/e", "(cp-d)/e", "a/c*",
                "c*/b2", "(c*-d)/e", "(c'-d)/e"):
        ttft.add_column(col, justify="right")
    snaps = Table(title="Snapshot and checkout throughput (GB/s)")
    for col in ("tokens", "snapshot", "warm store", "D2H", "snap/D2H", "warm/D2H",
                "restore (c-d)", "restore (c*-d)", "H2D", "restore/H2D", "tier restore/H2D"):
        snaps.add_column(col, justify="right")
    rows = []
    for key, r in ours["results"].items():
        n = int(key)
        copies = ours["copies"][key]
        a, d = median(r["cold"]), median(r["warm"])
        c = median(r["checkout"]) if r.get("checkout") else None
        ct = median(r["checkout_tier"]) if r.get("checkout_tier") else None
        e, d2h = copies["h2d"], copies["d2h"]
        b = _peer(peers, "example", key)
        b2 = _peer(peers, "offloading", key)
        gb = r["kv_bytes"] / 1e9

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x * 1e3:,.0f}" if x >= 0.01 else f"{x * 1e3:.1f}"

        cu = median(r["checkout_unverified"]) if r.get("checkout_unverified") else None
        cp = median(r["checkout_per_page"]) if r.get("checkout_per_page") else None
        cr = median(r["checkout_pread"]) if r.get("checkout_pread") else None
        def ratio(x: float | None, y: float | None, fmt: str = "{:.2f}") -> str:
            return "-" if x is None or y is None else fmt.format(x / y)

        def over(x: float | None, d: float = d) -> float | None:  # restore overhead over the warm hit
            return None if x is None else x - d

        first = r["checkout"][0] if r.get("checkout") else None
        ttft.add_row(str(n), f"{r['kv_bytes'] / GiB:.1f}", f(a), f(b), f(b2), f(c), f(first),
                     f(cp), f(cr),
                     f(ct), f(cu), f(d), f(e), ratio(a, c, "{:.1f}x"), ratio(c, b), ratio(c, b2),
                     ratio(over(c), e, "{:.1f}"), ratio(over(cp), e, "{:.1f}"),
                     ratio(over(cr), e, "{:.1f}"),
                     ratio(a, ct, "{:.1f}x"), ratio(ct, b2),
                     ratio(over(ct), e, "{:.1f}"), ratio(over(cu), e, "{:.1f}"))

        def rate(x: float | None, gb: float = gb, d: float = d) -> str:
            return "-" if x is None else f"{gb / max(x - d, 1e-9):.1f}"

        def share(x: float | None, e: float = e, d: float = d) -> str:
            return "-" if x is None else f"{e / max(x - d, 1e-9):.0%}"

        snaps.add_row(str(n), f"{gb / r['snapshot']:.1f}", f"{gb / r['snapshot_warm_store']:.1f}",
                      f"{gb / d2h:.1f}", f"{(gb / r['snapshot']) / (gb / d2h):.0%}",
                      f"{(gb / r['snapshot_warm_store']) / (gb / d2h):.0%}",
                      rate(c), rate(ct), f"{gb / e:.1f}", share(c), share(ct))
        rows.append({"tokens": n, "a": a, "b": b, "b2": b2, "c": c, "c_tier": ct,
                     "c_unverified": cu, "c_per_page": cp, "c_pread": cr, "d": d,
                     "e": e, "d2h": d2h,
                     "snapshot": r["snapshot"], "snapshot_warm": r["snapshot_warm_store"],
                     "kv_bytes": r["kv_bytes"]})
    console.print(ttft)
    console.print(snaps)
    variants = Table(title="Checkouts with other connector settings (--part checkouts --config)")
    for col in ("tokens", "settings", "runs (ms)", "median", "(x-d)/e", "restore/H2D"):
        variants.add_column(col, justify="right")
    named = ("checkout", "checkout_tier", "checkout_unverified", "checkout_per_page",
             "checkout_pread")
    for key, r in ours["results"].items():
        for name, runs in r.items():
            if not name.startswith("checkout_") or name in named or not runs:
                continue
            x, d, e = median(runs), median(r["warm"]), ours["copies"][key]["h2d"]
            variants.add_row(key, name.removeprefix("checkout_"),
                             ", ".join(f"{t * 1e3:.0f}" for t in runs), f"{x * 1e3:.0f}",
                             f"{(x - d) / e:.2f}", f"{e / max(x - d, 1e-9):.0%}")
    if variants.rows:
        console.print(variants)
    save("report", {"rows": rows})


def _peer(peers: dict[str, Any], name: str, key: str) -> float | None:
    runs = peers.get(name, {}).get(key)
    return median(runs["load"]) if runs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="all", choices=[
        "ours", "unverified", "checkouts", "per-page", "pread", "peers", "offloading", "report",
        "all"])
    parser.add_argument("--quick", action="store_true", help="tiny model, short prompts")
    parser.add_argument("--host-tier-gib", type=int, default=0,
                        help="--part ours: keep pages in a host tier of this size")
    parser.add_argument("--host-tier-dir", default="/dev/shm")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="prompt lengths in tokens (default 8192 32768 131072)")
    parser.add_argument("--config", help="--part checkouts: more kv_connector_extra_config, as "
                                         "JSON (e.g. '{\"staging_slots\": 8}')")
    parser.add_argument("--name", help="--part checkouts with --config: results go under "
                                       "checkout_NAME")
    parser.add_argument("--trace", action="store_true",
                        help="our servers mark each checkout's phases (PROCESSFORK_TRACE=1); "
                             "print where the time goes (bench/trace_phases.py)")
    opts = parser.parse_args()
    setup = Setup(opts.quick, opts.host_tier_gib, opts.host_tier_dir, opts.lengths, opts.trace)
    log(f"model {setup.model} ({setup.kv_per_token // 1024} KiB of KV per token), "
        f"lengths {setup.lengths}, cuda={setup.cuda}")
    if opts.part in ("ours", "all"):
        part_ours(setup)
    if opts.part == "checkouts":
        part_checkouts(setup, verify=True, config_extra=json.loads(opts.config or "{}"),
                       name=opts.name)
    if opts.part == "per-page":
        part_checkouts(setup, verify=True, native=False)
    if opts.part == "pread":
        part_checkouts(setup, verify=True, reader="pread")
    if opts.part in ("unverified", "all"):
        part_checkouts(setup, verify=False)
    if opts.part in ("peers", "all"):
        part_peers(setup)
    if opts.part == "offloading":
        part_peers(setup, only_offloading=True)
    if opts.part in ("report", "all"):
        part_report(setup)


if __name__ == "__main__":
    sys.exit(main())
