"""How `pf serve` starts vLLM's OpenAI server with the ProcessFork plugin wired in: the plan.

``pf serve``, the tests, the demo and the benchmarks all start vLLM from a plan built here, so they
run the same configuration:

- ``VLLM_PLUGINS`` names ``processfork`` (it is the allow-list for our general plugin and the
  switch for our HTTP routes), keeping any plugins the user already listed;
- ``--kv-transfer-config`` loads ``ProcessForkConnector`` with the store path;
- ``--enable-prefix-caching``, because checkout hands restored pages to vLLM's prefix cache;
- on the CPU backend: block size 32, an explicit KV cache size, and worker threads pinned to
  fixed cores (thread count changes float rounding, so it must not drift between runs), one
  share of them per tensor-parallel rank.

User arguments are passed through untouched: an option the user gives replaces our default
instead of being appended after it. The plan runs ``python -m processfork.plugin.launcher serve
...`` (launcher.py). Building a plan starts nothing: server_process.py runs it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CONNECTOR_MODULE",
    "DEFAULT_KVCACHE_GIB",
    "FRONTEND_CPUS_ENV",
    "LaunchPlan",
    "build_plan",
    "default_store",
    "is_cpu_build",
    "kv_transfer_config",
    "option_names",
    "option_value",
    "pinned_cpus",
    "rank_cpus",
]

DEFAULT_CONNECTOR_MODULE = "processfork.plugin.connector"
CONNECTOR_CLASS = "ProcessForkConnector"
PLUGIN_NAME = "processfork"

# 32 is the smallest block the CPU attention kernels run at full speed ("vec"/"amx" need a
# multiple of 32). Blocks are also the unit of sharing: a fork that diverges mid-block re-stores
# that whole block, and vLLM's prefix cache reuses only full blocks. 32 keeps both losses small,
# while pages (one block's K or V, all layers) stay tens to hundreds of KiB, far above LMDB's
# per-entry overhead. vLLM's CPU default of 128 would make every fork re-store up to 4x more.
DEFAULT_BLOCK_SIZE = 32
# GiB of KV cache for the CPU backend when VLLM_CPU_KVCACHE_SPACE is unset. vLLM's own fallback
# sizes the cache from --gpu-memory-utilization (0.9 of RAM), which does not fit next to anything.
DEFAULT_KVCACHE_GIB = 2
# Cores for the server's API server and EngineCore (see apply_frontend_affinity).
FRONTEND_CPUS_ENV = "PF_FRONTEND_CPUS"


def default_store() -> Path:
    """The store's own default (``$PF_STORE``, else ``~/.processfork``), made absolute.

    Absolute because the server's processes may not share the caller's working directory.
    """
    from processfork.store import default_store_path

    return Path(default_store_path()).expanduser().resolve()


def is_cpu_build() -> bool:
    """Whether the installed vLLM is a CPU build, decided the way vLLM itself decides it.

    Reads package metadata only: importing vLLM here would cost seconds for a decision about
    command-line defaults.
    """
    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        return True
    try:
        return "cpu" in importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def kv_transfer_config(
    store: Path,
    connector_module: str = DEFAULT_CONNECTOR_MODULE,
    *,
    auto_restore: bool = True,
    remote: str | None = None,
    host_tier_mib: int = 0,
) -> dict:
    extra: dict = {"store": str(store)}
    if not auto_restore:
        extra["auto_restore"] = False
    if remote is not None:
        extra["remote"] = remote
    if host_tier_mib > 0:
        extra["host_tier_mib"] = int(host_tier_mib)
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": connector_module,
        "kv_role": "kv_both",
        # A page that fails to load (missing or corrupt in the store) is recomputed by vLLM
        # instead of failing the request; the checkout still reports the integrity error.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


def _allowed_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def pinned_cpus(threads: int | None) -> list[int]:
    """The cores the worker's OpenMP threads are bound to: the first ``threads`` allowed cores.

    The default leaves one core free for the API server and EngineCore processes, as vLLM's
    automatic binding does, but fixed: vLLM reserves one more core whenever a KV connector is
    configured, so its automatic choice differs between runs with and without the plugin.
    """
    allowed = _allowed_cpus()
    if threads is None:
        threads = max(1, len(allowed) - 1)
    if threads < 1 or threads > len(allowed):
        raise ValueError(f"--threads must be between 1 and {len(allowed)}, got {threads}")
    return allowed[:threads]


def rank_cpus(threads: int | None, tp_size: int = 1) -> list[list[int]]:
    """The cores of each tensor-parallel rank's OpenMP threads: ``pinned_cpus`` split into
    ``tp_size`` contiguous shares (vLLM's CPU backend takes one list per rank, ``0-3|4-7``).

    Every rank needs a core of its own, so when leaving one core to the frontend would leave
    fewer cores than ranks (two ranks on two cores), the ranks take every allowed core.
    """
    if tp_size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {tp_size}")
    cpus = pinned_cpus(threads)
    if tp_size == 1:
        return [cpus]
    if len(cpus) < tp_size and threads is None:
        cpus = _allowed_cpus()
    if len(cpus) < tp_size:
        raise ValueError(f"--tensor-parallel-size {tp_size} needs a core per rank on the CPU "
                         f"backend; {len(cpus)} {'is' if len(cpus) == 1 else 'are'} available")
    share = len(cpus) // tp_size
    return [cpus[r * share : (r + 1) * share] for r in range(tp_size)]


def _tp_size(args: Sequence[str]) -> int:
    """The ``--tensor-parallel-size`` (or ``-tp``) the user gave; 1 when none."""
    value = option_value(args, "--tensor-parallel-size") or option_value(args, "-tp")
    if value is None:
        return 1
    if not value.isdigit():
        raise ValueError(f"--tensor-parallel-size must be a positive integer, got {value!r}")
    return int(value)


def _cpu_list(cpus: Sequence[int]) -> str:
    """Compress [0,1,2,5] to "0-2,5" (the syntax of VLLM_CPU_OMP_THREADS_BIND)."""
    parts: list[str] = []
    start = prev = cpus[0]
    for cpu in [*cpus[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def option_names(args: Sequence[str]) -> set[str]:
    """Long option names the user gave, normalized the way vLLM's parser normalizes them.

    ``--block_size=16``, ``--block-size 16`` and ``--kv-transfer-config.kv_role x`` count as
    ``--block-size`` and ``--kv-transfer-config``; ``--no-X`` also counts as ``--X``.
    """
    names: set[str] = set()
    for arg in args:
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0].split(".", 1)[0].replace("_", "-")
        names.add(name)
        if name.startswith("--no-"):
            names.add("--" + name[len("--no-"):])
    return names


def option_value(args: Sequence[str], name: str) -> str | None:
    """The last value given for ``name`` (``--name v`` or ``--name=v``), as argparse would."""
    value = None
    for i, arg in enumerate(args):
        key, eq, inline = arg.partition("=")
        if key.replace("_", "-") != name:
            continue
        if eq:
            value = inline
        elif i + 1 < len(args):
            value = args[i + 1]
    return value


@dataclass
class LaunchPlan:
    """What to run, and the stock ``vllm serve`` line that does the same."""

    model: str
    vllm_args: list[str]
    env: dict[str, str]
    """Only the variables we set or changed; the server gets os.environ plus these."""
    frontend_cpus: list[int] | None = None
    """Cores for the server's own processes (API server, EngineCore), kept off the worker's
    cores; the worker's OpenMP threads bind to theirs whatever they inherit. None: inherit."""

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "processfork.plugin.launcher", "serve", self.model,
                *self.vllm_args]

    def full_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {**(os.environ if base is None else base), **self.env}
        if self.frontend_cpus:
            env[FRONTEND_CPUS_ENV] = _cpu_list(self.frontend_cpus)
        return env

    def stock_command(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        cmd = shlex.join(["vllm", "serve", self.model, *self.vllm_args])
        if self.frontend_cpus:
            cmd = f"taskset -c {_cpu_list(self.frontend_cpus)} {cmd}"
        return f"{env} {cmd}" if env else cmd


def build_plan(
    model: str,
    extra_args: Sequence[str] = (),
    *,
    store: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    connector_module: str | None = None,
    env: Mapping[str, str] | None = None,
    cpu: bool | None = None,
    auto_restore: bool = True,
    remote: str | None = None,
    host_tier_mib: int = 0,
) -> LaunchPlan:
    """Decide the vLLM arguments and environment for serving ``model``.

    ``env`` is the environment the server would inherit (default: os.environ); settings already
    present there (VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND) are respected.
    """
    base_env = os.environ if env is None else env
    extra = list(extra_args)
    given = option_names(extra)
    store_path = Path(store).expanduser().resolve() if store is not None else default_store()
    cpu = is_cpu_build() if cpu is None else cpu

    args: list[str] = []
    if "--kv-transfer-config" not in given:
        config = kv_transfer_config(
            store_path, connector_module or DEFAULT_CONNECTOR_MODULE, auto_restore=auto_restore,
            remote=remote, host_tier_mib=host_tier_mib,
        )
        args += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]
    if "--enable-prefix-caching" not in given:
        args.append("--enable-prefix-caching")
    if cpu and "--block-size" not in given:
        args += ["--block-size", str(DEFAULT_BLOCK_SIZE)]

    plan_env: dict[str, str] = {"PF_STORE": str(store_path)}
    plugins = [p for p in base_env.get("VLLM_PLUGINS", "").split(",") if p.strip()]
    if PLUGIN_NAME not in plugins:
        plugins.append(PLUGIN_NAME)
    plan_env["VLLM_PLUGINS"] = ",".join(plugins)
    frontend_cpus: list[int] | None = None
    if cpu:
        if threads is not None or "VLLM_CPU_OMP_THREADS_BIND" not in base_env:
            ranks = rank_cpus(threads, _tp_size(extra))
            plan_env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(_cpu_list(r) for r in ranks)
            worker_cpus = [c for r in ranks for c in r]
            frontend_cpus = [c for c in _allowed_cpus() if c not in worker_cpus] or None
        if "VLLM_CPU_KVCACHE_SPACE" not in base_env and "--kv-cache-memory-bytes" not in given:
            plan_env["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_KVCACHE_GIB)
    return LaunchPlan(model=model, vllm_args=[*args, *extra], env=plan_env,
                      frontend_cpus=frontend_cpus)
