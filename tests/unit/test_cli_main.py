"""The `pf` entry point: option precedence, one-line errors, exit codes, and the console script."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from processfork.store import (
    AmbiguousRevision,
    CorruptPage,
    InvalidAge,
    InvalidName,
    MissingObject,
    RefConflict,
    StoreFull,
    StoreNotFound,
    UnknownRevision,
    UnsupportedFormat,
)
from test_cli_support import History, bare, build_history, pf

from processfork_cli.errors import (
    ExitCode,
    IntegrityProblems,
    ServerError,
    ServerUnreachable,
    UserError,
    describe,
)


@pytest.fixture
def history(tmp_path: Path) -> History:
    return build_history(tmp_path / "store")


def _closed_port() -> int:
    """A local port nobody listens on (bound, then released), so connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_missing_store_is_a_user_error(tmp_path: Path) -> None:
    result = pf(tmp_path / "nowhere", "log")
    assert result.exit_code == 1
    hint = "pass --store DIR or set PF_STORE; a store is created by its first snapshot"
    assert result.error_lines == [f"pf: error: no store at {tmp_path / 'nowhere'} ({hint})"]
    assert not (tmp_path / "nowhere").exists()  # read-only commands never create a store


def test_store_option_precedence(history: History, tmp_path: Path) -> None:
    elsewhere = str(tmp_path / "elsewhere")
    # --store beats PF_STORE, and the option after the command beats the one before it.
    assert pf(history.path, "--store", elsewhere, "log").exit_code == 1
    assert pf(history.path, "log", "--store", elsewhere).exit_code == 1
    ok = pf(None, "--store", elsewhere, "log", "--store", str(history.path), "-q")
    assert ok.exit_code == 0 and ok.stdout.splitlines() == [history.child, history.base]


def test_no_arguments_prints_help(history: History) -> None:
    result = pf(history.path)
    assert result.exit_code == 0
    assert "Usage: pf" in result.stdout and "fork" in result.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["frobnicate"], "No such command 'frobnicate'"),
        (["log", "--bogus"], "No such option: --bogus"),
        (["log", "-n", "zero"], "'-n' / '--max-count'"),
        (["diff", "base"], "Missing argument 'B'"),
    ],
)
def test_usage_errors_are_one_line_exit_2(history: History, args: list[str], needle: str) -> None:
    result = pf(history.path, *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(result.error_lines) == 1
    assert result.error_lines[0].startswith("pf: error: ")
    assert needle in result.stderr


def test_json_mode_errors_leave_stdout_empty(history: History) -> None:
    result = pf(history.path, "show", "missing-ref", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.error_lines) == 1


def test_quiet_mode_has_no_narration(history: History) -> None:
    result = pf(history.path, "fork", "base", "-n", "2", "-q")
    assert result.exit_code == 0
    assert result.stderr == ""
    assert len(result.stdout.splitlines()) == 2
    loud = pf(history.path, "fork", "base", "-n", "2", "--name", "loud")
    assert "forked base into 2 children" in loud.stderr


def test_pf_debug_shows_the_exception(history: History) -> None:
    with pytest.raises(UnknownRevision):
        pf(history.path, "show", "missing-ref", env={"PF_DEBUG": "1"})


@pytest.mark.parametrize(
    "args",
    [["log"], ["show", "base"], ["refs"], ["branch"], ["fork", "base", "-n", "2"]],
)
def test_via_server_unreachable_exit_2_with_hint(history: History, args: list[str]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    result = pf(history.path, *args, "--via-server", "--server", url)
    assert result.exit_code == 2
    assert len(result.error_lines) == 1
    assert f"cannot reach {url}" in result.stderr
    assert f"is `pf serve` running at {url}?" in result.stderr


def test_server_url_from_environment(history: History) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    result = pf(history.path, "refs", "--via-server", env={"PF_SERVER": url})
    assert result.exit_code == 2 and url in result.stderr


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (UnknownRevision("x"), ExitCode.USER),
        (AmbiguousRevision("abcdef0", ["sha256:" + "a" * 64, "sha256:" + "b" * 64]), ExitCode.USER),
        (InvalidName("a b", "space"), ExitCode.USER),
        (InvalidAge("soon"), ExitCode.USER),
        (RefConflict("main", None, "sha256:" + "a" * 64), ExitCode.USER),
        (StoreNotFound("/nowhere"), ExitCode.USER),
        (UserError("bad"), ExitCode.USER),
        (ServerError(404, "NotFound", "unknown cid", "http://h"), ExitCode.USER),
        (ServerError(409, "IncompatibleSnapshot", "fingerprint differs", "http://h"), ExitCode.USER),
        (ServerError(503, "EngineBusy", "no blocks", "http://h"), ExitCode.SERVER),
        (ServerError(507, "StoreFull", "full", "http://h"), ExitCode.SERVER),
        (ServerUnreachable("http://h", "connection refused"), ExitCode.SERVER),
        (StoreFull("/s", "No space left on device"), ExitCode.SERVER),
        (RuntimeError("a bug"), ExitCode.SERVER),
        (MissingObject("page", "ab" * 16), ExitCode.INTEGRITY),
        (CorruptPage("ab" * 16, "cd" * 16), ExitCode.INTEGRITY),
        (UnsupportedFormat("paged-v9"), ExitCode.INTEGRITY),
        (IntegrityProblems(2), ExitCode.INTEGRITY),
    ],
)
def test_exit_code_mapping(exc: BaseException, code: ExitCode) -> None:
    problem = describe(exc)
    assert problem.exit_code == code
    assert "\n" not in problem.message


def test_http_status_is_never_the_exit_code() -> None:
    assert describe(ServerError(404, "NotFound", "m", "http://h")).exit_code == 1
    assert describe(ServerError(500, "Internal", "m", "http://h")).exit_code == 2


def _pf_command() -> list[str]:
    script = Path(sys.executable).with_name("pf")
    return [str(script)] if script.exists() else [sys.executable, "-m", "processfork_cli"]


@pytest.mark.parametrize(
    "command", [_pf_command(), [sys.executable, "-m", "processfork_cli"]], ids=["script", "module"]
)
def test_console_script_subprocess(history: History, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PF_")}
    ok = subprocess.run(
        [*command, "--store", str(history.path), "log", "--json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert [e["cid"] for e in json.loads(ok.stdout)["entries"]] == [history.child, history.base]

    bad = subprocess.run(
        [*command, "--store", str(history.path), "show", bare(history.base)[:5]],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_version_names_the_package_vllm_and_the_store_format(tmp_path):
    import importlib.metadata

    from processfork.store.manifest import FORMAT

    package = importlib.metadata.version("processfork-vllm")
    for args in (("--version",), ("version",)):
        result = pf(tmp_path / "no-store", *args)
        assert result.exit_code == 0, result.stderr
        assert result.stdout.startswith(f"pf {package} (vLLM ")
        assert FORMAT in result.stdout and "+cpu" in result.stdout
    doc = json.loads(pf(None, "--json", "version").stdout)
    assert doc == {"processfork-vllm": package, "vllm": doc["vllm"], "store_format": FORMAT}
    assert doc["vllm"].split(".")[:2] == ["0", "32"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.0.0.1:8000/",
                                 "http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/",
                                 "http://127.0.0.1:8000/v1/processfork"])
def test_openai_style_server_urls_mean_the_server(url):
    from processfork_cli.client import server_base

    assert server_base(url) == "http://127.0.0.1:8000"


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost", "ftp://host", "http://"])
def test_a_server_url_without_a_scheme_is_a_user_error(history: History, url: str) -> None:
    result = pf(history.path, "refs", "--via-server", env={"PF_SERVER": url})
    assert result.exit_code == 1
    assert len(result.error_lines) == 1 and "server URL" in result.stderr
    assert "cannot reach" not in result.stderr


@pytest.mark.parametrize(
    "status,error_type,message,local,hint",
    [
        (404, "not_found", "unknown revision 'x'", UnknownRevision("x"), "pf refs"),
        (500, "integrity_error", "page 00 is corrupt", CorruptPage("00", "11"), "pf fsck"),
        (409, "unsupported_format", "format v9", UnsupportedFormat("v9"), "pf fsck"),
        (507, "store_full", "store full", StoreFull("/s", "full"), "pf gc"),
        (409, "ref_conflict", "changed", RefConflict("r", "a", "b"), "pf refs"),
    ],
)
def test_server_errors_exit_as_the_same_local_errors(status, error_type, message, local, hint):
    through_server = describe(ServerError(status, error_type, message, "http://h"))
    assert through_server.exit_code == describe(local).exit_code
    assert hint in (through_server.hint or "")


def test_command_table_names_exactly_what_the_modules_register() -> None:
    """`pf X` loads only X's module, so the table must not drift from the modules' `register`."""
    import importlib

    import typer

    from processfork_cli.app import COMMAND_MODULES, COMMANDS

    registered: dict[str, str] = {}
    for module in COMMAND_MODULES:
        app = typer.Typer()
        importlib.import_module(module).register(app)
        names = [c.name for c in app.registered_commands]
        names += [g.name or g.typer_instance.info.name for g in app.registered_groups]
        assert all(names), f"{module} registers a command without an explicit name"
        registered.update(dict.fromkeys(names, module))
    assert registered == COMMANDS


@pytest.mark.parametrize(
    ("args", "command"),
    [
        ([], None),
        (["--help"], None),
        (["log", "-n", "3"], "log"),
        (["--store", "log", "show"], "show"),
        (["--server=http://x", "-q", "--json", "fork", "a"], "fork"),
        (["--api-key", "k", "--", "gc"], "gc"),
    ],
)
def test_invoked_command_skips_global_options(args: list[str], command: str | None) -> None:
    from processfork_cli.app import invoked_command

    assert invoked_command(args) == command


def test_help_lists_every_command(tmp_path: Path) -> None:
    from processfork_cli.app import COMMANDS

    result = pf(tmp_path / "none", "--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f" {name} " in result.stdout, name
