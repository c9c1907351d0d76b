"""`pf serve` builds the right vLLM command line (launch_plan.py) and the server process gets the
core mask it asks for (launcher.py). No server is started here."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from processfork.plugin import launch_plan
from processfork.plugin.launch_plan import build_plan, pinned_cpus


def _plan(*extra: str, env: dict[str, str] | None = None, **kwargs):
    return build_plan("m", list(extra), store="/tmp/pf-store-x", env=env or {}, cpu=True,
                      **kwargs)


def _kv_config(args: list[str]) -> dict:
    return json.loads(args[args.index("--kv-transfer-config") + 1])


def test_plan_wires_plugin_connector_and_prefix_caching():
    plan = _plan()
    config = _kv_config(plan.vllm_args)
    assert config["kv_connector"] == "ProcessForkConnector"
    assert config["kv_connector_module_path"] == "processfork.plugin.connector"
    assert config["kv_role"] == "kv_both"
    assert config["kv_connector_extra_config"] == {"store": str(Path("/tmp/pf-store-x").resolve())}
    assert "--enable-prefix-caching" in plan.vllm_args
    assert plan.vllm_args[plan.vllm_args.index("--block-size") + 1] == "32"
    assert plan.env["VLLM_PLUGINS"] == "processfork"
    assert plan.env["VLLM_CPU_KVCACHE_SPACE"] == str(launch_plan.DEFAULT_KVCACHE_GIB)
    assert plan.argv[1:4] == ["-m", "processfork.plugin.launcher", "serve"]


@pytest.mark.parametrize(
    ("user_args", "absent"),
    [
        (["--block-size", "64"], "--block-size 32"),
        (["--block_size=16"], "--block-size 32"),
        (["--no-enable-prefix-caching"], "--enable-prefix-caching"),
        (["--kv-transfer-config", "{}"], "ProcessForkConnector"),
        (["--kv-transfer-config.kv_role", "kv_both"], "ProcessForkConnector"),
    ],
)
def test_user_arguments_replace_defaults(user_args, absent):
    plan = _plan(*user_args)
    assert plan.vllm_args[-len(user_args):] == user_args  # passed through untouched, last
    assert absent not in shlex.join(plan.vllm_args)


def test_existing_environment_is_respected():
    plan = _plan(env={"VLLM_PLUGINS": "theirs", "VLLM_CPU_KVCACHE_SPACE": "7",
                      "VLLM_CPU_OMP_THREADS_BIND": "0"})
    assert plan.env["VLLM_PLUGINS"] == "theirs,processfork"
    assert "VLLM_CPU_KVCACHE_SPACE" not in plan.env
    assert "VLLM_CPU_OMP_THREADS_BIND" not in plan.env
    assert "VLLM_CPU_KVCACHE_SPACE" not in _plan("--kv-cache-memory-bytes", "1G").env


def test_threads_are_pinned_to_the_first_cores():
    allowed = sorted(os.sched_getaffinity(0))
    assert _plan(threads=1).env["VLLM_CPU_OMP_THREADS_BIND"] == str(allowed[0])
    assert pinned_cpus(None) == allowed[: max(1, len(allowed) - 1)]
    with pytest.raises(ValueError, match="--threads"):
        _plan(threads=len(allowed) + 1)


def test_frontend_is_kept_off_the_worker_cores():
    allowed = sorted(os.sched_getaffinity(0))
    plan = _plan(threads=1)
    if len(allowed) == 1:
        assert plan.frontend_cpus is None  # nothing left over: share the only core
        return
    assert plan.frontend_cpus == allowed[1:]
    assert f"taskset -c {launch_plan._cpu_list(allowed[1:])} vllm serve m" in plan.stock_command()
    # A binding the user chose is theirs: the frontend is left alone too.
    assert _plan(env={"VLLM_CPU_OMP_THREADS_BIND": "0"}).frontend_cpus is None
    assert build_plan("m", [], store="/tmp/s", env={}, cpu=False).frontend_cpus is None


@pytest.mark.parametrize(("cores", "args", "threads", "bind", "frontend"), [
    # Each rank gets its share of the cores a TP-1 worker would have; the rest are the frontend's.
    (8, ["--tensor-parallel-size", "2"], None, "0-2|3-5", [6, 7]),
    (8, ["-tp", "2"], 4, "0-1|2-3", [4, 5, 6, 7]),
    (8, ["--tensor-parallel-size=4"], None, "0|1|2|3", [4, 5, 6, 7]),
    # Two ranks on two cores: one core each, the frontend shares them.
    (2, ["--tensor-parallel-size", "2"], None, "0|1", None),
    (4, ["--tensor-parallel-size", "1"], None, "0-2", [3]),
])
def test_each_tensor_parallel_rank_gets_its_own_cores(monkeypatch, cores, args, threads, bind,
                                                      frontend):
    monkeypatch.setattr(launch_plan, "_allowed_cpus", lambda: list(range(cores)))
    plan = _plan(*args, threads=threads)
    assert plan.env["VLLM_CPU_OMP_THREADS_BIND"] == bind
    assert plan.frontend_cpus == frontend


@pytest.mark.parametrize(("cores", "args", "threads", "message"), [
    (2, ["--tensor-parallel-size", "4"], None, "needs a core per rank"),
    (8, ["--tensor-parallel-size", "2"], 1, "needs a core per rank"),
    (8, ["--tensor-parallel-size", "two"], None, "positive integer"),
])
def test_a_tensor_parallel_size_without_a_core_per_rank_is_refused(monkeypatch, cores, args,
                                                                    threads, message):
    monkeypatch.setattr(launch_plan, "_allowed_cpus", lambda: list(range(cores)))
    with pytest.raises(ValueError, match=message):
        _plan(*args, threads=threads)


def test_frontend_affinity_reaches_the_server_process():
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two cores")
    plan = _plan(threads=1)
    code = ("import os, sys; from processfork.plugin.launcher import apply_frontend_affinity; "
            "apply_frontend_affinity(os.environ); print(sorted(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=plan.full_env()).stdout
    assert json.loads(out) == allowed[1:]
    assert launch_plan.FRONTEND_CPUS_ENV not in plan.env  # shown as taskset, not as a variable


def test_cpu_list_is_compressed():
    assert launch_plan._cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_non_cpu_plan_has_no_cpu_settings():
    plan = build_plan("m", [], store="/tmp/s", env={}, cpu=False)
    assert "--block-size" not in plan.vllm_args
    assert not {"VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"} & set(plan.env)


def _pf(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "processfork_cli", *args], capture_output=True, text=True,
        timeout=120, check=False, env={**os.environ, **(env or {})},
    )


def test_pf_serve_print_command(tmp_path):
    result = _pf("serve", "some/model", "--port", "8001", "--block-size", "64", "--print-command",
                 env={"PF_STORE": str(tmp_path / "store")})
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "VLLM_PLUGINS=processfork" in line
    words = shlex.split(line)
    serve_at = words.index("vllm")
    assert words[serve_at: serve_at + 3] == ["vllm", "serve", "some/model"]
    assert words[-4:] == ["--port", "8001", "--block-size", "64"]
    assert _kv_config(words)["kv_connector_extra_config"]["store"] == str(tmp_path / "store")


def test_pf_serve_no_auto_restore_turns_transparent_restores_off(tmp_path):
    env = {"PF_STORE": str(tmp_path / "store")}
    on = _pf("serve", "m", "--print-command", env=env)
    off = _pf("serve", "m", "--no-auto-restore", "--print-command", env=env)
    assert on.returncode == off.returncode == 0, on.stderr + off.stderr
    assert "auto_restore" not in _kv_config(shlex.split(on.stdout))["kv_connector_extra_config"]
    extra = _kv_config(shlex.split(off.stdout))["kv_connector_extra_config"]
    assert extra["auto_restore"] is False


def test_pf_serve_rejects_too_many_threads():
    result = _pf("serve", "m", "--threads", str(len(os.sched_getaffinity(0)) + 1),
                 "--print-command")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "--threads" in result.stderr


def test_host_tier_reaches_the_connector_config_of_a_gpu_plan():
    plan = build_plan("m", [], store="/tmp/s", env={}, cpu=False, host_tier_mib=16 * 1024)
    assert _kv_config(plan.vllm_args)["kv_connector_extra_config"]["host_tier_mib"] == 16384
    plain = build_plan("m", [], store="/tmp/s", env={}, cpu=False)
    assert "host_tier_mib" not in _kv_config(plain.vllm_args)["kv_connector_extra_config"]


def test_pf_serve_host_tier_is_ignored_with_a_warning_on_the_cpu_build(tmp_path):
    # This suite runs on vLLM's CPU build, where pages go straight into the KV blocks.
    result = _pf("serve", "m", "--host-tier", "2", "--print-command",
                 env={"PF_STORE": str(tmp_path / "store")})
    assert result.returncode == 0, result.stderr
    assert "--host-tier" in result.stderr
    extra = _kv_config(shlex.split(result.stdout))["kv_connector_extra_config"]
    assert "host_tier_mib" not in extra
    bad = _pf("serve", "m", "--host-tier", "-1", "--print-command")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
