"""`make demo` runs for real here, as a subprocess, so it cannot rot.

The demo is run on the session's tiny model (`--model`) instead of building its own larger one:
the flow, the server it starts and restarts, and every check it prints are the same; only the
prefill timings it reports would be less telling, and no test asserts on timings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BLOCK = 32
DEMO_TIMEOUT = 900
REPO_ROOT = Path(__file__).resolve().parents[2]


def _demo_argv(workdir: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "processfork_dev.demo", "--workdir", str(workdir),
            "--model", str(model)]


def _env() -> dict[str, str]:
    """`make demo` runs from the repository's root, where `processfork_dev` is importable."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}


def _server_pids(store: Path) -> list[int]:
    """Processes started for this store: the launcher gives every server process PF_STORE."""
    marker = f"PF_STORE={store.resolve()}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _assert_nothing_left(store: Path) -> None:
    """The demo returns only after stopping its server; allow a moment for the kernel to reap."""
    deadline = time.monotonic() + 15
    while _server_pids(store) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _server_pids(store) == [], "server processes outlived the demo"


@dataclass
class DemoRun:
    """The demo as a child process whose output goes to files (no pipe for it to fill)."""

    workdir: Path
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def stop(self) -> None:
        """Clean-up for a run nobody waited for: SIGTERM, which the demo handles (see below)."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def result(self) -> subprocess.CompletedProcess[str]:
        try:
            code = self.popen.wait(DEMO_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return subprocess.CompletedProcess(
            self.popen.args, code, self.stdout_path.read_text(errors="replace"),
            self.stderr_path.read_text(errors="replace"))


def launch_ahead(servers) -> DemoRun:
    """`make demo` starts and restarts a server of its own: it runs beside the module before."""
    workdir = servers.tmp_path_factory.mktemp("demo")
    logs = servers.tmp_path_factory.mktemp("demo-output")
    out, err = logs / "stdout.txt", logs / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        popen = subprocess.Popen(_demo_argv(workdir, servers.tiny_model), env=_env(),
                                 stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    return DemoRun(workdir, popen, out, err)


@pytest.fixture(scope="module")
def demo_run(servers):
    run = servers.take(__name__) or launch_ahead(servers)
    return run.workdir, run.result()


def test_demo_exits_cleanly(demo_run):
    workdir, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    _assert_nothing_left(workdir / "store")


def test_demo_prints_its_proofs(demo_run):
    _, proc = demo_run
    out = proc.stdout + proc.stderr  # `pf` narration ("deleted base/2") goes to stderr
    for line in (
        "[1/10] Use the given model",
        "$ pf snapshot base --prompt-file",
        "$ pf fork base -n 3",
        "$ pf checkout base/1",
        "prefill skipped: vLLM reports cached_tokens",
        "continuation after restore: identical (16 tokens, logprobs bit-for-bit)",
        "$ pf log --graph --all",
        "(HEAD -> base/1)",
        "deleted base/2",
        "gc: removed",
        "server stopped; demo finished",
    ):
        assert line in out, f"missing {line!r} in:\n{out[-6000:]}"


def test_demo_summary_holds_what_it_claims(demo_run):
    workdir, _ = demo_run
    s = json.loads((workdir / "summary.json").read_text())
    base, branches, restore, gc = s["base"], s["branches"], s["restore"], s["gc"]

    assert 1500 <= base["num_tokens"] <= 3000
    assert base["num_pages"] == -(-base["num_tokens"] // BLOCK)
    for branch, fork_cid in zip(branches, s["forks"]):
        assert branch["parents"] == [fork_cid]  # base -> fork child -> branch
        assert branch["num_tokens"] > base["num_tokens"]
        shared = base["num_tokens"] // BLOCK
        assert branch["new_pages"] == branch["num_pages"] - shared  # only the suffix is new
    assert len({b["cid"] for b in branches}) == len(branches)

    split = (restore["prompt_tokens"] - 1) // BLOCK * BLOCK
    assert restore["identical"] is True and restore["compared_tokens"] == 16
    assert restore["tokens_loaded"] == split
    assert restore["first_token_cached_tokens"] == split
    assert s["sharing"]["bytes_stored"] < s["sharing"]["bytes_referenced"]

    dropped = next(b for b in branches if b["ref"] == gc["ref"])
    assert gc["removed_num_snapshots"] == 2  # the branch and its fork child
    assert gc["removed_num_pages"] == 2 * dropped["new_pages"]  # a K and a V page per block


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_demo_stops_its_server(tmp_path: Path, tiny_model: Path, sig, code):
    """Ctrl-C (or SIGTERM) while the server starts: the demo exits and leaves nothing running."""
    workdir = tmp_path / "demo"
    store = workdir / "store"
    # A test run started in the background of a shell inherits SIGINT ignored (POSIX shells do
    # that for `&` jobs), and so would the demo; a user's Ctrl-C reaches a foreground demo. A
    # handled (not ignored) signal is reset to its default in the child at exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(_demo_argv(workdir, tiny_model), env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 120
        while not _server_pids(store):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the demo never started its server"
            time.sleep(0.2)
        time.sleep(2)  # let vLLM spawn its engine processes, the case that must be cleaned up
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, out[-4000:]
    assert "stopping the server" in out
    _assert_nothing_left(store)
