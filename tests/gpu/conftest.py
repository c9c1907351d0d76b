"""Real ``vllm serve`` on a CUDA GPU with the connector: the GPU suite (skipped without CUDA).

Run it on a GPU machine with ``bash tests/gpu/run.sh`` (or ``pytest tests/gpu``). The model is a
tiny random Llama in bf16 (head size 64, which FlashAttention supports); the servers use vLLM's
default block size on CUDA (16) and ``--enforce-eager``, so an engine starts in seconds instead of
compiling kernels for minutes. Prompts are longer than the step budget, so prefills are chunked.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))  # pf_http

from processfork_dev.live_server import LiveServer

try:
    import torch

    HAVE_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch comes with vLLM
    HAVE_CUDA = False

MODELS_DIR = Path(os.environ.get("PF_TEST_MODELS", REPO_ROOT / ".models"))
#: Set (to 32) to run the suite on vLLM's CPU backend: a dry run of the tests' own logic.
DRY_RUN_BLOCK = os.environ.get("PF_GPU_SUITE_BLOCK")
BLOCK = int(DRY_RUN_BLOCK or 16)
DTYPE = "float32" if DRY_RUN_BLOCK else "bfloat16"
SERVER_ARGS: tuple[str, ...] = (*(("--block-size", DRY_RUN_BLOCK) if DRY_RUN_BLOCK else ()),
    "--enforce-eager",
    "--dtype", DTYPE,
    "--max-model-len", "4096",
    "--max-num-batched-tokens", "256",
    "--gpu-memory-utilization", "0.2",
    "--kv-cache-memory-bytes", "2G",
    "--enable-prompt-tokens-details",
    # e.g. "--attention-backend TRITON_ATTN": the same suite on another of vLLM's backends
    *shlex.split(os.environ.get("PF_GPU_SUITE_ARGS", "")),
)
_STARTED: list[LiveServer] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not HAVE_CUDA and not DRY_RUN_BLOCK:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_model() -> Path:
    from processfork_dev.model_builder import build_tiny_llama

    return build_tiny_llama(MODELS_DIR / f"tiny-{DTYPE}", dtype=DTYPE)


@pytest.fixture(scope="session")
def other_gpu_model() -> Path:
    from processfork_dev.model_builder import build_tiny_llama

    return build_tiny_llama(MODELS_DIR / f"tiny-{DTYPE}-3layer", dtype=DTYPE, num_layers=3,
                            seed=1)


@pytest.fixture(scope="session")
def start_gpu_server(tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[Callable[..., LiveServer]]:
    log_dir = tmp_path_factory.mktemp("gpu-server-logs")
    started: list[LiveServer] = []

    def start(model: Path, *, store: Path | None = None, extra_args: Sequence[str] = (),
              env: dict[str, str] | None = None, api_key: str | None = None) -> LiveServer:
        live = LiveServer(model=model, store=store or tmp_path_factory.mktemp("pf-store"),
                          extra_args=(*SERVER_ARGS, *extra_args), log_dir=log_dir,
                          env=dict(env or {}), api_key=api_key)
        started.append(live)
        _STARTED.append(live)
        return live.start()

    yield start
    for live in reversed(started):
        live.stop()


@pytest.fixture(scope="session")
def gpu_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pf-store-gpu")


@pytest.fixture(scope="session")
def gpu_server(start_gpu_server, gpu_model, gpu_store) -> LiveServer:
    return start_gpu_server(gpu_model, store=gpu_store)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for live in _STARTED:
            report.sections.append((f"server log (port {live.port})", live.log_tail()))
