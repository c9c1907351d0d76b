"""Running a launch plan (launch_plan.py): a server in its own process group, waited on until
it is ready, and stopped leaving no process behind; or `pf serve` replacing itself with it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .launch_plan import LaunchPlan, build_plan, option_names, option_value

__all__ = ["ServerProcess", "ServerStartError", "exec_foreground", "find_free_port",
           "launch_server"]


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log tail."""


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
        served = option_value(self.plan.vllm_args, "--served-model-name")
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
    given = option_names(extra_args)
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
