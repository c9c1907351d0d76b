"""The README's quick start runs as written, so it cannot rot.

Each example block in README.md is preceded by a marker comment, `<!-- readme-test: KIND -->`:

- `shell` and `python` blocks run in order, in one scratch folder, against the session server:
  `PF_SERVER` and `PF_STORE` point at it, exactly as a reader would set them for a server that
  is not on port 8000;
- the `serve` block runs with `--print-command` added to its `pf serve` line: the session server
  is already the same launcher on the same model, and a second server would only cost time. The
  test checks that the line it prints wires the plugin in.

A block left unmarked would go untested, so the test also requires every `sh`/`python` block of
the quick start to carry a marker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<kind>\w+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```",
    re.DOTALL,
)


def _blocks() -> list[tuple[str | None, str, str]]:
    """(marker kind, fence language, body) of every fenced block, in README order."""
    return [(m["kind"], m["lang"], m["body"]) for m in BLOCK.finditer(README.read_text())]


def _quick_start() -> list[tuple[str | None, str, str]]:
    text = README.read_text()
    start, end = text.index("## Quick start"), text.index("## Documentation")
    return [(m["kind"], m["lang"], m["body"]) for m in BLOCK.finditer(text[start:end])]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme")


@pytest.fixture(scope="module")
def env(server, pf_store) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # where `pf` is installed next to this python
    # The scratch folder stands in for the checkout a reader works in: `python -m
    # processfork_dev.model_builder` imports from the repository's root.
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    out = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": python_path,
           "PF_SERVER": server.base_url, "PF_STORE": str(pf_store), "NO_COLOR": "1"}
    if server.api_key:
        out["PF_API_KEY"] = server.api_key
    return out


def _run(kind: str, body: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = ["bash", "-e", "-c", body] if kind != "python" else [sys.executable, "-c", body]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def test_every_quick_start_example_is_tested():
    blocks = _quick_start()
    assert [k for k, _, _ in blocks] == ["serve", "shell", "python", "shell"]
    assert all(lang in ("sh", "python") for _, lang, _ in blocks)
    assert len(_blocks()) >= len(blocks)


def test_serve_block_wires_the_plugin_in(scratch, env):
    (kind, _, body), *_ = _quick_start()
    assert kind == "serve"
    lines = [ln for ln in body.splitlines() if ln.strip()]
    assert any(ln.startswith("pf serve ") for ln in lines)
    script = "\n".join(ln + " --print-command" if ln.startswith("pf serve ") else ln
                       for ln in lines)
    result = _run("shell", script, scratch, env)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = result.stdout
    for part in ("VLLM_PLUGINS=processfork", "vllm serve", "--kv-transfer-config",
                 "ProcessForkConnector", "--enable-prefix-caching", "--dtype float32",
                 "--enable-prompt-tokens-details"):
        assert part in printed, printed
    assert (scratch / ".models" / "tiny" / "config.json").is_file()  # the builder line ran


def test_client_blocks_run_against_a_live_server(scratch, env):
    """The shell, python and curl examples, in README order, in one folder."""
    outputs = []
    for kind, _, body in _quick_start()[1:]:
        result = _run(kind, body, scratch, env)
        assert result.returncode == 0, f"{kind} block failed:\n{body}\n{result.stdout}{result.stderr}"
        outputs.append(result.stdout + result.stderr)
    cli, python, curl = outputs

    assert re.search(r"sha256:[0-9a-f]{64}", cli)
    assert "base/11" in cli  # pf log --graph --all shows the twelve branches
    match = re.search(r"(\d+) of (\d+) prompt tokens from cache", python)
    assert match and int(match[1]) > 0, python  # the checked-out context was served from cache
    assert re.search(r"base/3 -> sha256:[0-9a-f]{64}: \d+ new of \d+ blocks", python), python
    assert curl.count('"cid"') >= 2 and '"cids"' in curl and '"ok":true' in curl.replace(" ", "")
