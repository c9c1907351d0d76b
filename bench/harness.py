"""Shared plumbing of the server benchmarks: models, servers, timed requests, tables, JSON.

Every benchmark compares numbers measured side by side in one run, so everything that could
differ between the configurations is decided here, once:

- every server runs through the launcher's plan (``pf serve``), with the worker pinned to the
  same ``THREADS`` cores whether or not a KV connector is configured (vLLM reserves one more
  core when one is, so its automatic choice would differ), and the thread count each worker
  really got is read back from its log;
- the same model, dtype, block size, KV cache size and scheduler budget;
- ``VLLM_SERVER_DEV_MODE=1`` on every server, for ``/reset_prefix_cache`` (a cold prefix cache
  without a restart).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from processfork.plugin.launch_plan import LaunchPlan, build_plan, kv_transfer_config
from processfork.plugin.server_process import ServerProcess, find_free_port
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # processfork_dev, when run as `python bench/<script>.py`

from processfork_dev.model_builder import PRESETS, build_model

BENCH_DIR = REPO / ".bench"
MODELS_DIR = Path(os.environ.get("PF_TEST_MODELS", REPO / ".models"))
THREADS = 1
"""Worker threads of every server: the launcher's default on 2 cores, fixed for all modes."""
PF = "/v1/processfork"
MiB = 1 << 20

console = Console() if sys.stdout.isatty() else Console(width=180)


# -- models and prompts ------------------------------------------------------------------------
def model_path(preset: str) -> Path:
    """Build (or reuse) the preset's random Llama under ``.models/<preset>``."""
    return build_model(MODELS_DIR / preset, PRESETS[preset])


def kv_bytes_per_token(preset: str) -> int:
    spec = PRESETS[preset]
    return 2 * spec.num_layers * spec.kv_heads * spec.head_dim * 4  # K and V, fp32


def tokens(seed: int, n: int, vocab: int = 1024, low: int = 10) -> list[int]:
    """Token ids that no other prompt of the run shares (ids below ``low`` are special)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(low, vocab) for _ in range(n)]


# -- servers -----------------------------------------------------------------------------------
def example_connector_config(path: Path) -> str:
    return json.dumps({
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": str(path)},
    }, separators=(",", ":"))


def _without(args: list[str], name: str) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


@dataclass
class Server:
    """One ``pf serve`` process; ``mode`` is ``pf`` (our connector), ``example`` (vLLM's
    ExampleConnector, prefix caching off), ``plain`` (no connector) or ``custom`` (the
    ``--kv-transfer-config`` given in ``args`` replaces ours)."""

    name: str
    model: Path
    mode: str
    store: Path
    args: Sequence[str]
    served_name: str = "bench"
    connector_extra: dict[str, Any] = field(default_factory=dict)
    """Extra ``kv_connector_extra_config`` keys of our connector (``pf`` mode)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the server."""
    port: int = field(default_factory=find_free_port)
    process: ServerProcess | None = None
    starts: int = 0
    client: httpx.Client | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def plan(self) -> LaunchPlan:
        extra = ["--host", "127.0.0.1", "--port", str(self.port),
                 "--served-model-name", self.served_name, *self.args]
        if self.mode == "pf" and self.connector_extra:
            config = kv_transfer_config(self.store.resolve())
            config["kv_connector_extra_config"].update(self.connector_extra)
            extra += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]
        if self.mode == "example":
            extra += ["--kv-transfer-config", example_connector_config(self.store),
                      "--no-enable-prefix-caching"]
        env = {"VLLM_SERVER_DEV_MODE": "1", **self.env}
        plan = build_plan(str(self.model), extra, store=self.store, threads=THREADS,
                          env={**os.environ, **env})
        plan.env.update(env)
        if self.mode == "plain":
            plan.vllm_args = _without(plan.vllm_args, "--kv-transfer-config")
        return plan

    def start(self, timeout: float = 600.0) -> Server:
        self.starts += 1
        plan = self.plan()
        log = BENCH_DIR / "logs" / f"{self.name}-{self.starts}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            out.write(f"==> {plan.stock_command()}\n".encode())
            out.flush()
            popen = subprocess.Popen(
                plan.argv, env=plan.full_env(), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.process = ServerProcess(popen=popen, plan=plan, host="127.0.0.1", port=self.port,
                                     log_path=log)
        try:
            seconds = self.process.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.client = httpx.Client(base_url=self.base_url, timeout=900.0, trust_env=False)
        console.log(f"{self.name}: ready in {seconds:.0f} s (worker threads {self.threads()})")
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.process is not None:
            self.process.stop()

    def freeze(self, frozen: bool) -> None:
        """Stop (SIGSTOP) or continue (SIGCONT) every process of the server.

        Several servers up at once on a small machine disturb each other even when idle: an
        idle worker still wakes up on its pinned core (a few percent of it), and that core is
        the measured worker's. A frozen server takes no CPU at all and resumes where it was.
        """
        assert self.process is not None
        os.killpg(os.getpgid(self.process.popen.pid),
                  signal.SIGSTOP if frozen else signal.SIGCONT)

    def restart(self) -> Server:
        self.stop()
        return self.start()

    def __enter__(self) -> Server:  # noqa: PYI034 - a plain class, never subclassed
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- checks ------------------------------------------------------------------------------
    def threads(self) -> int:
        """Cores the worker's OpenMP threads are bound to, from vLLM's binding report.

        Every mode logs it; a server with our connector also reports the thread count it
        recorded in its fingerprint, which must agree.
        """
        assert self.process is not None
        text = self.process.log_path.read_text(errors="replace")
        found = re.findall(r"local_rank=0, core ids=\[([^\]]*)\]", text)
        if not found:
            raise SystemExit(f"{self.name}: no OpenMP binding report in {self.process.log_path}")
        count = len([c for c in found[-1].split(",") if c.strip()])
        if self.mode == "pf":
            recorded = self.status()["engine"]["fingerprint"].get("threads")
            check(recorded == count, f"{self.name}: fingerprint threads {recorded} != {count}")
        check(count == THREADS, f"{self.name}: worker bound to {count} cores, not {THREADS}")
        return count

    # -- requests ----------------------------------------------------------------------------
    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.client is not None
        response = self.client.post(path, json=body)
        if response.status_code != 200:
            raise SystemExit(f"{self.name}: POST {path} -> {response.status_code}: "
                             f"{response.text[:500]}")
        return response.json()

    def timed(self, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        t = time.perf_counter()
        out = self.post(path, body)
        return time.perf_counter() - t, out

    def complete(self, prompt: list[int], max_tokens: int = 1) -> tuple[float, dict[str, Any]]:
        """One greedy completion, timed client-side (with max_tokens=1 this is TTFT)."""
        return self.timed("/v1/completions", {
            "model": self.served_name, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "logprobs": 1, "return_token_ids": True,
        })

    def reset_prefix_cache(self) -> None:
        assert self.client is not None
        for _ in range(50):
            r = self.client.post("/reset_prefix_cache")
            if r.status_code == 200 and r.json().get("success"):
                return
            time.sleep(0.1)
        raise SystemExit(f"{self.name}: /reset_prefix_cache did not succeed")

    def metric(self, name: str, **labels: str) -> float:
        assert self.client is not None
        text = self.client.get("/metrics").text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith((name + "{", name + " ")):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def status(self) -> dict[str, Any]:
        assert self.client is not None
        r = self.client.get(f"{PF}/status")
        if r.status_code != 200:
            raise SystemExit(f"{self.name}: status -> {r.status_code}: {r.text[:300]}")
        return r.json()


def first_token(completion: dict[str, Any]) -> int:
    """The id of the first generated token (its text may be empty)."""
    return int(completion["choices"][0]["token_ids"][0])


# -- statistics, tables, results ---------------------------------------------------------------
def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def median_interval(xs: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: order statistics chosen by the binomial.

    The k-th smallest and k-th largest of n samples bracket the true median with probability
    1 - 2 P(Binomial(n, 1/2) < k); k is the largest rank that keeps this >= ``confidence``. With
    fewer than 6 samples no such k exists at 95% and the interval is the whole range.
    """
    xs = sorted(xs)
    n = len(xs)
    k = 0
    tail = 0.0
    for j in range(n // 2):
        tail += math.comb(n, j) / 2**n  # P(Binomial(n, 1/2) <= j)
        if 2 * tail > 1 - confidence:
            break
        k = j + 1
    k = max(k, 1)
    return xs[k - 1], xs[n - k]


def best_time(fn: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def memcpy_seconds(nbytes: int, repeat: int = 15) -> float:
    """One numpy copy of ``nbytes`` between two preallocated, already-touched buffers (best of N)."""
    import numpy as np

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    np.copyto(dst, src)
    return best_time(lambda: np.copyto(dst, src), repeat)


@dataclass
class Target:
    measure: str
    ours: str
    baseline: str
    value: str
    target: str
    ok: bool | None  # None: informational


def vllm_bench_serve(srv: Server, model: Path, dataset_args: Sequence[str], *, num_prompts: int,
                     concurrency: int, seed: int, out: Path,
                     metrics: str = "ttft,tpot,itl,e2el",
                     request_rate: float | None = None) -> dict[str, Any]:
    """One run of vLLM's own ``vllm bench serve`` against ``srv``; its result JSON.

    Every request is sent at once under ``concurrency`` (or, with ``request_rate``, at that many
    per second on average, Poisson arrivals drawn from ``seed``), greedy, with a fixed output
    length (``--ignore-eos``); the run must complete every request.
    """
    cmd = [
        sys.executable, "-m", "processfork.plugin.launcher", "bench", "serve",
        "--backend", "openai", "--base-url", srv.base_url, "--endpoint", "/v1/completions",
        "--model", srv.served_name, "--tokenizer", str(model), *dataset_args,
        "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
        "--request-rate", "inf" if request_rate is None else str(request_rate),
        "--ignore-eos", "--temperature", "0", "--seed", str(seed),
        "--percentile-metrics", metrics, "--metric-percentiles", "50,99",
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


def check(ok: bool, what: str) -> None:
    """The benchmark also checks what it measured: a fast wrong answer must not print a ratio."""
    if not ok:
        raise SystemExit(f"benchmark self-check failed: {what}")


def targets_table(title: str, rows: Sequence[Target]) -> Table:
    table = Table(title=title)
    for col in ("Measure", "Ours", "Baseline", "Ratio / value", "Target", "Result"):
        table.add_column(col, justify="left" if col == "Measure" else "right")
    for r in rows:
        result = "-" if r.ok is None else ("[green]PASS[/]" if r.ok else "[red]MISS[/]")
        table.add_row(r.measure, r.ours, r.baseline, r.value, r.target, result)
    return table


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def targets_markdown(rows: Sequence[Target]) -> str:
    return markdown_table(
        ("Measure", "Ours", "Baseline", "Ratio / value", "Target", "Result"),
        [(r.measure, r.ours, r.baseline, r.value, r.target,
          "-" if r.ok is None else ("PASS" if r.ok else "MISS")) for r in rows],
    )


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy the machine was."""
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu": model,
        "vcpus": os.cpu_count(),
        "ram_gib": round(mem / (1 << 30), 1),
        "loadavg": os.getloadavg(),
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"{name}.json"
    payload = {"machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    console.log(f"raw numbers: {path.relative_to(REPO)}")
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON: {type(obj)}")


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"
