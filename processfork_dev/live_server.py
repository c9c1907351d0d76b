"""A real server a test session starts, stops and restarts on the same port and store.

Shared by the CPU integration suite (tests/integration) and the GPU suite (tests/gpu), which add
their fixtures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from processfork.plugin.server_process import ServerProcess, find_free_port, launch_server

__all__ = ["READY_TIMEOUT", "LiveServer"]

# From launch to ready. A test session starts servers while others start or serve (each start is
# mostly one core's imports), so a start may take several times its 30-120 s on a busy machine.
READY_TIMEOUT = float(os.environ.get("PF_TEST_SERVER_TIMEOUT", "600"))


@dataclass
class LiveServer:
    """A started server plus what is needed to start it again the same way."""

    model: Path
    store: Path
    extra_args: tuple[str, ...]
    log_dir: Path
    served_name: str = "tiny"
    api_key: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the server."""
    port: int = field(default_factory=find_free_port)
    process: ServerProcess | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model_name(self) -> str:
        return self.served_name

    @property
    def log_path(self) -> Path | None:
        return self.process.log_path if self.process else None

    def start(self) -> LiveServer:
        return self.launch().wait()

    def launch(self) -> LiveServer:
        """Start the server's processes and return at once; ``wait`` for it to be ready."""
        self.starts += 1
        self.process = launch_server(
            self.model,
            port=self.port,
            store=self.store,
            extra_args=["--served-model-name", self.served_name, *self.extra_args],
            log_path=self.log_dir / f"server-{self.port}-{self.starts}.log",
            api_key=self.api_key,
            env=self.env or None,
        )
        return self

    def wait(self) -> LiveServer:
        """Block until the launched server answers (ServerStartError when it never does)."""
        assert self.process is not None, "launch() first"
        self.process.wait_ready(READY_TIMEOUT)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def restart(self) -> LiveServer:
        """Stop and start on the same port and store: the engine comes back with a cold cache."""
        self.stop()
        return self.start()

    def log_tail(self, max_chars: int = 6000) -> str:
        return self.process.log_tail(max_chars) if self.process else ""
