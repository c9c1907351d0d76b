"""The Typer app `pf`: global options and the list of command modules.

Each command module exposes `register(app)`. To add a command, register it in its module and name
it in `COMMANDS`; `main()` (processfork_cli/main.py) does the error handling.

`pf` starts for every command, and Typer reads the signature of every registered command on each
start, so `build_app` registers only the module of the command being run. For `--help`, a bare `pf`
or an unknown name, where click must list every command but runs none, it registers them all for
listing only: their names, help and panels, without the parameters Typer would read.
tests/unit/test_cli_main.py checks that `COMMANDS` names exactly what the modules register, and
that the listed help is the full app's.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Sequence

import typer
from typer.models import CommandInfo

from processfork_cli.options import (
    DEFAULT_SERVER,
    GlobalApiKeyOpt,
    GlobalServerOpt,
    GlobalStoreOpt,
    JsonOpt,
    QuietOpt,
)
from processfork_cli.settings import Settings
from processfork_cli.version import VersionOpt

__all__ = ["COMMANDS", "COMMAND_MODULES", "build_app", "invoked_command", "wants_help"]

HELP = """Git for the KV cache of a running vLLM server.

Snapshot, fork, checkout, log and gc the paged KV cache, stored by content in an LMDB store.
Exit codes: 0 ok, 1 user error, 2 server/engine/system error, 3 integrity error (see docs/cli.md).
"""

def _global_options(
    ctx: typer.Context,
    server: GlobalServerOpt = None,
    store: GlobalStoreOpt = None,
    api_key: GlobalApiKeyOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
    version: VersionOpt = False,
) -> None:
    ctx.obj = Settings(
        server=server or DEFAULT_SERVER,
        store_path=store,
        api_key=api_key or None,
        json=bool(json_),
        quiet=bool(quiet),
    )
    if ctx.invoked_subcommand is None:
        # A bare `pf` shows the help (on stdout, exit 0) instead of click's exit-2 usage error.
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


COMMANDS: dict[str, str] = {
    "log": "processfork_cli.commands_history",
    "reflog": "processfork_cli.commands_history",
    "show": "processfork_cli.commands_objects",
    "diff": "processfork_cli.commands_objects",
    "fork": "processfork_cli.commands_objects",
    "refs": "processfork_cli.commands_refs",
    "branch": "processfork_cli.commands_refs",
    "ref": "processfork_cli.commands_refs",
    "reset": "processfork_cli.commands_refs",
    "status": "processfork_cli.commands_maint",
    "fsck": "processfork_cli.commands_maint",
    "gc": "processfork_cli.commands_maint",
    "serve": "processfork_cli.commands_server",
    "snapshot": "processfork_cli.commands_live",
    "checkout": "processfork_cli.commands_live",
    "repair": "processfork_cli.commands_live",
    "remote": "processfork_cli.commands_remote",
    "push": "processfork_cli.commands_remote",
    "fetch": "processfork_cli.commands_remote",
    "pull": "processfork_cli.commands_remote",
    "clone": "processfork_cli.commands_remote",
    "version": "processfork_cli.version",
}

COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(COMMANDS.values()))

# Global options that take a value: the word after them is not the command's name.
_VALUE_OPTIONS = frozenset({"--server", "--store", "--api-key"})


def invoked_command(args: Sequence[str]) -> str | None:
    """The command named in `args` after the global options, or None (help, bare `pf`)."""
    words = iter(args)
    for word in words:
        if word == "--":
            return next(words, None)
        if word in _VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def wants_help(args: Sequence[str]) -> bool:
    """Whether `args` show a help page: `-h`/`--help` before `--`, or no command (a bare `pf`).

    Only a hint for what to load first: click alone decides what the words mean."""
    words = iter(args)
    for word in words:
        if word == "--":
            break
        if word in _VALUE_OPTIONS:
            next(words, None)
        elif word in ("-h", "--help"):
            return True
    return invoked_command(args) is None


def build_app(args: Sequence[str] | None = None) -> typer.Typer:
    """The `pf` app. Every command without `args`; with them, only what they can run: the named
    command's module, or every command listed but not runnable when they name none we know."""
    app = typer.Typer(
        name="pf",
        help=HELP,
        invoke_without_command=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_global_options)
    command = invoked_command(args) if args is not None else None
    modules = (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(app)
    if args is not None and command not in COMMANDS:
        _list_only(app)
    return app


def _list_only(app: typer.Typer) -> None:
    """Replace `app`'s commands (and its groups' commands) by copies that click can list but not run."""
    app.registered_commands = [_listed(info) for info in app.registered_commands]
    groups = []
    for info in app.registered_groups:
        group = copy.copy(info)
        group.typer_instance = copy.copy(info.typer_instance)
        _list_only(group.typer_instance)
        groups.append(group)
    app.registered_groups = groups


def _listed(info: CommandInfo) -> CommandInfo:
    """`info` with the name and help Typer would derive from its callback, and a callback without
    parameters in its place."""
    listed = copy.copy(info)
    listed.name = info.name or typer.main.get_command_name(info.callback.__name__)
    listed.help = inspect.getdoc(info.callback) if info.help is None else info.help
    listed.callback = _listed_only
    return listed


def _listed_only() -> None:
    raise RuntimeError("a command built for listing was run; build_app should have loaded it")


def __getattr__(name: str) -> typer.Typer:
    # `app` (every command) for callers that drive the CLI in-process, e.g. typer's CliRunner.
    if name == "app":
        return build_app()
    raise AttributeError(name)
