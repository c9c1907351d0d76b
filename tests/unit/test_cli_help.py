"""`pf`'s help pages: the fast top-level help is the full app's help, and it skips the heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_support import pf
from typer.testing import CliRunner

from processfork_cli.app import build_app, wants_help

ENV = {"COLUMNS": "200", "NO_COLOR": "1", "PF_STORE": None, "PF_SERVER": None, "PF_API_KEY": None}


@pytest.mark.parametrize(
    ("args", "help_"),
    [
        ([], True),
        (["--help"], True),
        (["-h"], True),
        (["--json"], True),
        (["--store", "-h", "log"], False),
        (["log", "--help"], True),
        (["ref", "set", "-h"], True),
        (["log", "-n", "3"], False),
        (["frobnicate"], False),
        (["--", "log", "--help"], False),
    ],
)
def test_wants_help(args: list[str], help_: bool) -> None:
    assert wants_help(args) is help_


@pytest.mark.parametrize("args", [["--help"], [], ["--json"]])
def test_top_level_help_is_the_full_apps_help(tmp_path: Path, args: list[str]) -> None:
    """`pf --help` lists commands without reading their parameters; the page must not change."""
    full = CliRunner().invoke(build_app(), ["--help"], prog_name="pf", env=ENV)
    assert full.exit_code == 0
    listed = pf(tmp_path / "none", *args)
    assert listed.exit_code == 0, listed.stderr
    assert listed.stdout == full.stdout
    assert "ref" in listed.stdout and "Set or delete one ref" in listed.stdout


def test_listed_commands_do_not_run() -> None:
    app = build_app(["--help"])
    listed = [info.callback for info in app.registered_commands]
    listed += [c.callback for g in app.registered_groups for c in g.typer_instance.registered_commands]
    assert len(set(listed)) == 1
    with pytest.raises(RuntimeError, match="listing"):
        listed[0]()
    # The groups were copied: the module's own group still runs its commands.
    full_groups = build_app().registered_groups
    assert all(c.callback is not listed[0] for g in full_groups for c in g.typer_instance.registered_commands)


def test_unknown_command_is_still_an_error(tmp_path: Path) -> None:
    result = pf(tmp_path / "none", "frobnicate")
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.stderr


_PROBE = """
import json, sys
from processfork_cli.main import run
code = run(sys.argv[1:])
loaded = sorted(m for m in ("rich.markdown", "markdown_it", "pygments", "rich.traceback", "logging")
                if m in sys.modules)
import rich.markdown, rich.traceback, typer.rich_utils as ru
md = ru._make_rich_text(text="**bold**", style="", markup_mode="markdown")
tb = ru.Traceback.from_exception(ValueError, ValueError("x"), None)
print(json.dumps({"code": code, "loaded": loaded,
                  "markdown": isinstance(md, rich.markdown.Markdown),
                  "traceback": isinstance(tb, rich.traceback.Traceback)}), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["log", "--help"]])
def test_help_defers_markdown_and_tracebacks_until_used(tmp_path: Path, args: list[str]) -> None:
    """A fresh process: typer's help formatter loads without rich.markdown and rich.traceback (and a
    help page, which opens no store, without logging), and its Markdown and Traceback still work,
    as the real classes, when something uses them."""
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "NO_COLOR": "1",
           "PF_STORE": str(tmp_path / "none"),
           # The code under test, where it is not the installed copy.
           **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stderr.splitlines()[-1])
    assert report == {"code": 0, "loaded": [], "markdown": True, "traceback": True}
    assert "Usage: pf" in done.stdout
