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
  tests and the templated one of the chat tests, in one start.
- ``start_server``: a factory for more servers (another model, store, API key, arguments); all
  are stopped at the end of the session.

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


@pytest.fixture(scope="session")
def other_model() -> Path:
    """A model whose KV layout differs from ``tiny_model`` (3 layers, another seed)."""
    return build_tiny_llama(MODELS_DIR / "tiny-3layer", num_layers=3, seed=1)


@pytest.fixture(scope="session")
def pf_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pf-store")


@pytest.fixture(scope="session")
def start_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[Callable[..., LiveServer]]:
    """``start_server(model=None, *, store=None, extra_args=(), api_key=None)`` -> LiveServer.

    Defaults: ``tiny_model``, a fresh store, and ``DEFAULT_ARGS`` (``extra_args`` are added after
    them, so they win).
    """
    log_dir = tmp_path_factory.mktemp("server-logs")
    started: list[LiveServer] = []
    counter = itertools.count()

    def start(
        model: Path | None = None,
        *,
        store: Path | None = None,
        extra_args: Sequence[str] = (),
        api_key: str | None = None,
        served_name: str = SERVED_NAME,
    ) -> LiveServer:
        live = LiveServer(
            model=model or tiny_model,
            store=store or tmp_path_factory.mktemp(f"pf-store-{next(counter)}"),
            extra_args=(*DEFAULT_ARGS, *extra_args),
            log_dir=log_dir,
            served_name=served_name,
            api_key=api_key,
        )
        started.append(live)
        _STARTED.append(live)
        return live.start()

    yield start
    for live in reversed(started):
        live.stop()


def model_server(start_server: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory,
                 name: str, spec: Any, extra_args: Sequence[str]) -> Iterator[LiveServer]:
    """A module's own server of model ``spec`` (built once into ``MODELS_DIR/name``) on a fresh
    store, stopped when the module is done so that its cores go back to the other tests."""
    live = start_server(build_model(MODELS_DIR / name, spec),
                        store=tmp_path_factory.mktemp(f"pf-store-{name}"), extra_args=extra_args)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., LiveServer], pf_store: Path) -> LiveServer:
    """The session server. Its small token budget makes every long prompt prefill in chunks
    over several engine steps, so snapshots and loads are tested across chunk boundaries."""
    return start_server(store=pf_store, extra_args=SESSION_SERVER_ARGS)


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


@pytest.fixture(scope="session")
def other_server(start_server: Callable[..., LiveServer], other_model: Path, pf_store: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    return start_server(other_model, store=pf_store, api_key=OTHER_API_KEY,
                        extra_args=("--chat-template", str(template), *EAGER))


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
