"""One real ``vllm serve`` per test session, started the way ``pf serve`` starts it.

Fixtures:

- ``tiny_model`` / ``other_model``: random Llamas built once under ``<repo>/.models`` (gitignored);
  ``other_model`` has another layer count, so its snapshots are incompatible with ``tiny_model``.
- ``pf_store``: the session server's store directory.
- ``server``: a ``LiveServer`` on ``tiny_model`` with the real connector.
- ``restarted``: the session server's one restart. A module that compares what an engine did with
  what a fresh engine does defines ``prepare_before_restart(server, pf_store, openai_client)``;
  the first test that asks for ``restarted`` runs every selected module's function, in collection
  order, on the engine before, restarts the server once on the same port and store (a cold prefix
  cache), and hands each module what its function returned (``restarted.prepared[__name__]``).
  An engine start costs 25-120 s; one restart instead of one per module saves that much for
  every module after the first.
- ``openai_client``: an ``openai.OpenAI`` client for ``server`` (survives restarts).
- ``other_server``: a second server on ``other_model`` and the session store, guarded by an API
  key, with a chat template of its own (``CHAT_TEMPLATE``): the incompatible engine of the error
  tests and the templated one of the chat tests, in one start; launched beside ``server``.
- ``servers``: every server of the session (``Servers``): ``start``/``launch`` more (another
  model, store, API key, arguments, environment), and the servers launched ahead: a module
  whose first server depends on no earlier test defines ``launch_ahead(servers)``, and that
  start runs while the module before it is tested. All are stopped at the end of the session.
- ``start_server``: ``servers.start``.

A failing test that used a server gets the tail of that server's log in its report.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from processfork.plugin.launch_plan import rank_cpus

from processfork_dev.live_server import LiveServer
from processfork_dev.model_builder import build_model, build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = Path(os.environ.get("PF_TEST_MODELS", REPO_ROOT / ".models"))
SERVED_NAME = "tiny"
_STARTED: list[LiveServer] = []  # every server of the session, for failure reports

# fp32 so that fidelity comparisons measure our copies, not bf16 rounding (vLLM's CPU backend
# downcasts an fp32 checkpoint to bf16 unless told otherwise). 512 MiB of KV cache is 256K
# tokens of the tiny model: plenty, and quicker to allocate than the launcher's default.
# Prompt token details report cached_tokens in `usage`, so tests can see prefix-cache hits.
DEFAULT_ARGS: tuple[str, ...] = (
    "--dtype", "float32",
    "--kv-cache-memory-bytes", "512M",
    "--enable-prompt-tokens-details",
)


# Servers whose tests compare an engine's bits only with the same engine's run without
# torch.compile: a compiled start compiles the model again every time (vLLM 0.32's compile cache
# fails to load on CPU), 30-100 s of every start. The session server, and every server whose
# pages or continuations are compared with the session server's, stay compiled, as `pf serve` runs.
EAGER: tuple[str, ...] = ("--enforce-eager",)

# Prompts in the tests are 300-1000 tokens: a 256-token step budget chunks all of them.
SESSION_SERVER_ARGS: tuple[str, ...] = ("--max-model-len", "4096", "--max-num-batched-tokens", "256")

# The worker's threads on the cores `pf serve` binds them to (so the same bits), but the API
# server and EngineCore left free to use any core instead of the one `pf serve` keeps for them:
# the session starts servers beside each other (``Servers``), and each start is mostly imports
# on one core; pinned to the same core, two starts would take turns.
UNPINNED_FRONTEND: dict[str, str] = {
    "VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, r)) for r in rank_cpus(None)),
}

OTHER_API_KEY = "other-secret"
# Not the model's own template (processfork_dev/model_builder.py): a server given this file
# renders chats differently from one that uses the model's.
CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
    "{% if tools %}[TOOLS] {{ tools | length }}\n{% endif %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
)


@pytest.fixture(scope="session", autouse=True)
def _vllm_installed() -> None:
    """Integration tests need vLLM: its absence is a failure, never a skip."""
    for name in ("vllm", "torch", "openai"):
        if importlib.util.find_spec(name) is None:
            pytest.fail(f"{name} is not importable; install the project with its [cpu,dev] extras")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return build_tiny_llama(MODELS_DIR / "tiny")


def _other_model() -> Path:
    """A model whose KV layout differs from ``tiny_model`` (3 layers, another seed)."""
    return build_tiny_llama(MODELS_DIR / "tiny-3layer", num_layers=3, seed=1)


@pytest.fixture(scope="session")
def other_model() -> Path:
    return _other_model()


@pytest.fixture(scope="session")
def pf_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pf-store")


class Servers:
    """Every server of the session, and the ones launched ahead of the module that uses them.

    An engine start is 30-120 s, mostly imports on one core. A module whose first server needs
    nothing an earlier test made defines ``launch_ahead(servers) -> LiveServer`` (or any object
    with its own clean-up, like the demo's process); ``_launch_next_module_ahead`` calls it when
    the module before it begins, so that start runs beside that module's tests on the other core,
    and the module's fixture takes it with ``servers.take(__name__)``. One module ahead at most:
    a few servers alive at once fit in CI's memory.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.tiny_model = tiny_model
        self.log_dir = tmp_path_factory.mktemp("server-logs")
        self.started: list[LiveServer] = []
        self.ahead: dict[str, Any] = {}
        self._counter = itertools.count()

    def new_store(self, name: str | None = None) -> Path:
        return self.tmp_path_factory.mktemp(f"pf-store-{name or next(self._counter)}")

    def build(self, name: str, spec: Any) -> Path:
        """A model of ``spec``, built once into ``MODELS_DIR/name``."""
        return build_model(MODELS_DIR / name, spec)

    def launch(
        self,
        model: Path | None = None,
        *,
        store: Path | None = None,
        extra_args: Sequence[str] = (),
        api_key: str | None = None,
        served_name: str = SERVED_NAME,
        env: dict[str, str] | None = None,
    ) -> LiveServer:
        """Start a server and return at once (``.wait()`` for it). Defaults: ``tiny_model``, a
        fresh store, and ``DEFAULT_ARGS`` (``extra_args`` come after them, so they win)."""
        live = LiveServer(
            model=model or self.tiny_model,
            store=store or self.new_store(),
            extra_args=(*DEFAULT_ARGS, *extra_args),
            log_dir=self.log_dir,
            served_name=served_name,
            api_key=api_key,
            env={**UNPINNED_FRONTEND, **(env or {})},
        )
        self.started.append(live)
        _STARTED.append(live)
        return live.launch()

    def start(self, model: Path | None = None, **kwargs: Any) -> LiveServer:
        return self.launch(model, **kwargs).wait()

    def take(self, module: str) -> Any | None:
        """What ``launch_ahead`` of ``module`` launched, once; None when nothing was."""
        return self.ahead.pop(module, None)

    def module_server(self, module: str, launch: Callable[[Servers], LiveServer]) -> LiveServer:
        """The module's server: the one launched ahead for it, or one launched now; ready."""
        live = self.take(module) or launch(self)
        return live.wait()

    def stop_all(self) -> None:
        for leftover in self.ahead.values():  # launched ahead for a module that never ran
            leftover.stop()
        for live in reversed(self.started):
            live.stop()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Servers]:
    all_servers = Servers(tmp_path_factory, tiny_model)
    yield all_servers
    all_servers.stop_all()


@pytest.fixture(scope="module", autouse=True)
def _launch_next_module_ahead(request: pytest.FixtureRequest, servers: Servers) -> None:
    """When a module begins, launch the first server of the next selected module that can
    start ahead (``launch_ahead``)."""
    modules = list(dict.fromkeys(
        item.module for item in request.session.items if getattr(item, "module", None)))
    if request.module not in modules:
        return
    for module in modules[modules.index(request.module) + 1:]:
        launch = getattr(module, "launch_ahead", None)
        if launch is not None:
            if module.__name__ not in servers.ahead:
                servers.ahead[module.__name__] = launch(servers)
            return


@pytest.fixture(scope="session")
def start_server(servers: Servers) -> Callable[..., LiveServer]:
    """``start_server(model=None, *, store=None, extra_args=(), api_key=None, env=None)`` ->
    a ready LiveServer (see ``Servers.launch``); all are stopped at the end of the session."""
    return servers.start


def model_server(servers: Servers, module: str, launch: Callable[[Servers], LiveServer]
                 ) -> Iterator[LiveServer]:
    """A module's own server, stopped when the module is done so that its cores and memory go
    back to the other tests."""
    live = servers.module_server(module, launch)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest, servers: Servers, pf_store: Path) -> LiveServer:
    """The session server. Its small token budget makes every long prompt prefill in chunks
    over several engine steps, so snapshots and loads are tested across chunk boundaries.

    ``other_server`` starts beside it when a selected test will want it."""
    live = servers.launch(store=pf_store, extra_args=SESSION_SERVER_ARGS)
    if any("other_server" in getattr(item, "fixturenames", ()) for item in request.session.items):
        servers.ahead.setdefault("other_server", _launch_other_server(servers, pf_store))
    return live.wait()


@pytest.fixture(scope="session")
def openai_client(server: LiveServer):
    import openai

    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=server.api_key or "unused", max_retries=0,
        timeout=120.0,
    )


@dataclass
class Restarted:
    """What each module prepared on the session server's engine before its one restart."""

    prepared: dict[str, Any]
    old_pids: list[int]
    """The server's process and its children before the restart: none may outlive it."""


def _process_tree(pid: int) -> list[int]:
    import psutil

    return [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]


@pytest.fixture(scope="session")
def restarted(request: pytest.FixtureRequest, server: LiveServer, pf_store: Path,
              openai_client) -> Restarted:
    prepares: dict[str, Callable[..., Any]] = {}
    for item in request.session.items:
        module = getattr(item, "module", None)
        prepare = getattr(module, "prepare_before_restart", None)
        if module is not None and prepare is not None:
            prepares.setdefault(module.__name__, prepare)
    prepared = {name: prepare(server, pf_store, openai_client)
                for name, prepare in prepares.items()}
    assert server.process is not None
    old_pids = _process_tree(server.process.popen.pid)
    server.restart()
    return Restarted(prepared, old_pids)


def _launch_other_server(servers: Servers, pf_store: Path) -> LiveServer:
    template = servers.tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    return servers.launch(_other_model(), store=pf_store, api_key=OTHER_API_KEY,
                          extra_args=("--chat-template", str(template), *EAGER))


@pytest.fixture(scope="session")
def other_server(servers: Servers, pf_store: Path) -> LiveServer:
    return (servers.take("other_server") or _launch_other_server(servers, pf_store)).wait()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach the log tail of every server the session started to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for live in _STARTED:
        if live.process is not None:
            report.sections.append((f"server log {live.log_path}", live.log_tail()))
