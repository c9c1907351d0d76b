"""Fixtures of the unit tests that run vLLM's scheduler with our connector (engine_harness)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def vllm_config(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One VllmConfig for the session: building it imports vLLM and takes seconds."""
    from engine_harness import make_vllm_config

    return make_vllm_config(tmp_path_factory.mktemp("model"))


@pytest.fixture
def make_engine(vllm_config: Any, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``make_engine(**options)``: a fresh ``Engine`` on this test's store; closed at the end."""
    from engine_harness import Engine

    engines: list[Engine] = []

    def make(**options: Any) -> Engine:
        engine = Engine(vllm_config, tmp_path / "store", **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def engine(make_engine: Callable[..., Any]) -> Any:
    return make_engine()


@pytest.fixture
def native_reader():
    """The compiled page reader: it must build on every machine the tests run on."""
    from processfork.plugin.native_pages import native_pages

    found = native_pages()
    if found is None:
        pytest.fail("the native page reader did not build on this machine (it needs a C compiler)")
    return found
