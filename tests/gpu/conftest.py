"""Real ``vllm serve`` on a CUDA GPU with the connector: the GPU suite (skipped without CUDA).

Run it on a GPU machine with ``bash tests/gpu/run.sh`` (or ``pytest tests/gpu``). The model is a
tiny random Llama in bf16 (head size 64, which FlashAttention supports); the servers use vLLM's
default block size on CUDA (16) and ``--enforce-eager``, so an engine starts in seconds instead of
compiling kernels for minutes. Prompts are longer than the step budget, so prefills are chunked.

``PF_GPU_SUITE_EAGER=0`` runs the same servers in vLLM's default mode on CUDA instead: the model
compiled with ``torch.compile`` and CUDA graphs (full graphs for batches of decodes, piecewise
ones around attention otherwise), which is what ``pf serve MODEL`` runs when a user adds nothing.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))  # pf_http

from processfork.plugin.launch_plan import kv_transfer_config

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
#: "0": vLLM's default compilation and CUDA graphs instead of ``--enforce-eager``.
EAGER = os.environ.get("PF_GPU_SUITE_EAGER", "1") != "0"
SERVER_ARGS: tuple[str, ...] = (*(("--block-size", DRY_RUN_BLOCK) if DRY_RUN_BLOCK else ()),
    *(("--enforce-eager",) if EAGER else ()),
    "--dtype", DTYPE,
    "--max-model-len", "4096",
    "--max-num-batched-tokens", "256",
    "--gpu-memory-utilization", "0.2",
    "--kv-cache-memory-bytes", "2G",
    "--enable-prompt-tokens-details",
    # e.g. "--attention-backend TRITON_ATTN": the same suite on another of vLLM's backends
    *shlex.split(os.environ.get("PF_GPU_SUITE_ARGS", "")),
)
OTHER_API_KEY = "gpu-secret"
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
def launch_gpu_server(tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[Callable[..., LiveServer]]:
    """Start a server's processes and return at once (``.wait()`` for it to be ready)."""
    log_dir = tmp_path_factory.mktemp("gpu-server-logs")
    started: list[LiveServer] = []

    def launch(model: Path, *, store: Path | None = None, extra_args: Sequence[str] = (),
               env: dict[str, str] | None = None, api_key: str | None = None) -> LiveServer:
        live = LiveServer(model=model, store=store or tmp_path_factory.mktemp("pf-store"),
                          extra_args=(*SERVER_ARGS, *extra_args), log_dir=log_dir,
                          env=dict(env or {}), api_key=api_key)
        started.append(live)
        _STARTED.append(live)
        return live.launch()

    yield launch
    for live in reversed(started):
        live.stop()


@pytest.fixture(scope="session")
def gpu_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pf-store-gpu")


# -- servers launched together at the start of the session --------------------------------------
# On a freshly started GPU machine an engine's first start takes one to five minutes (imports,
# kernel compilation, CUDA initialisation), mostly on one or two host cores. One after another,
# the suite's engines did not fit one 10-minute command; launched together at the start, each
# test waits only for what is not ready yet. Each server has its own store and port, and a fixed
# KV-cache size (``--kv-cache-memory-bytes``), so vLLM skips the memory profiling that another
# engine's allocations could disturb.
LAUNCHED_AHEAD = ("gpu_server_launched", "hybrid_gpu_launched", "invariant_launched",
                  "other_gpu_launched")


@pytest.fixture(scope="session", autouse=True)
def _launch_ahead(request: pytest.FixtureRequest) -> None:
    """Launch every server that a test of this session needs, before the first test runs."""
    needed: set[str] = set()
    for item in request.session.items:
        needed.update(getattr(item, "fixturenames", ()))
    for name in LAUNCHED_AHEAD:
        if name in needed:
            request.getfixturevalue(name)


@pytest.fixture(scope="session")
def gpu_server_launched(launch_gpu_server, gpu_model, gpu_store) -> LiveServer:
    return launch_gpu_server(gpu_model, store=gpu_store)


@pytest.fixture(scope="session")
def gpu_server(gpu_server_launched) -> LiveServer:
    return gpu_server_launched.wait()


@pytest.fixture(scope="session")
def other_gpu_launched(launch_gpu_server, other_gpu_model, gpu_store) -> LiveServer:
    """Another model on the same store, behind an API key: its checkouts must be refused."""
    return launch_gpu_server(other_gpu_model, store=gpu_store, api_key=OTHER_API_KEY)


#: A step budget below the hybrid prompt's length: the prefill takes several steps (on CUDA vLLM
#: keeps a Mamba layer's chunks on block boundaries itself). vLLM's CPU Mamba2 kernel takes one
#: block.
HYBRID_STEP_TOKENS = 128 if DRY_RUN_BLOCK else 1024


@pytest.fixture(scope="session")
def hybrid_gpu_model() -> Path:
    from processfork_dev.model_builder import HYBRID, build_model

    name = "tiny-hybrid" if DTYPE == HYBRID.dtype else f"tiny-hybrid-{DTYPE}"  # the CPU suite's
    return build_model(MODELS_DIR / name, replace(HYBRID, dtype=DTYPE))


@pytest.fixture(scope="session")
def hybrid_gpu_launched(launch_gpu_server, hybrid_gpu_model, tmp_path_factory) -> LiveServer:
    """The hybrid attention + Mamba2 model; ``wait()`` raises where vLLM cannot serve it cached."""
    store = tmp_path_factory.mktemp("pf-store-hybrid-gpu")
    # vLLM 0.26 on CUDA caches this model's Mamba states in its 'all' mode by default; the
    # connector stores the state at the split point of the 'align' mode, which every version
    # from 0.26 to 0.33 offers.
    args: tuple[str, ...] = ("--max-num-batched-tokens", str(HYBRID_STEP_TOKENS),
                             "--mamba-cache-mode", "align")
    if DRY_RUN_BLOCK:
        config = kv_transfer_config(store)
        config["kv_connector_extra_config"]["page_path"] = "staged"
        args += ("--block-size", "128", "--kv-transfer-config", json.dumps(config))
    return launch_gpu_server(hybrid_gpu_model, store=store, extra_args=args)


@pytest.fixture(scope="session")
def invariant_launched(request, launch_gpu_server, gpu_model, tmp_path_factory) -> LiveServer:
    """A server with VLLM_BATCH_INVARIANT=1 and a step budget that prefills prompts in one pass.

    It keeps pages in a host tier, so its checkouts after the restart are copied to the GPU from
    the tier's registered memory rather than read from the store."""
    store = tmp_path_factory.mktemp("pf-store-invariant")
    tier_dir = tempfile.mkdtemp(prefix="pf-tier-gpu-suite-", dir="/dev/shm")  # a tmpfs: pinnable
    request.addfinalizer(lambda: shutil.rmtree(tier_dir, ignore_errors=True))
    config = kv_transfer_config(store)
    config["kv_connector_extra_config"].update({"host_tier_mib": 256, "host_tier_dir": tier_dir})
    return launch_gpu_server(
        gpu_model, store=store,
        extra_args=("--max-num-batched-tokens", "4096", "--kv-transfer-config", json.dumps(config)),
        env={"VLLM_BATCH_INVARIANT": "1"},
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for live in _STARTED:
            report.sections.append((f"server log (port {live.port})", live.log_tail()))
