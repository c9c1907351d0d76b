"""The Typer app `pf`: global options and the list of command modules.

Each command module exposes `register(app)`. To add a group of commands, write a module with such a
function and name it in `COMMAND_MODULES`; `main()` (processfork_cli/main.py) does the error handling.
"""

from __future__ import annotations

import importlib

import typer

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

__all__ = ["COMMAND_MODULES", "app"]

HELP = """Git for the KV cache of a running vLLM server.

Snapshot, fork, checkout, log and gc the paged KV cache, stored by content in an LMDB store.
Exit codes: 0 ok, 1 user error, 2 server/engine/system error, 3 integrity error (see docs/cli.md).
"""

app = typer.Typer(
    name="pf",
    help=HELP,
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
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


COMMAND_MODULES: tuple[str, ...] = (
    "processfork_cli.commands_history",
    "processfork_cli.commands_objects",
    "processfork_cli.commands_refs",
    "processfork_cli.commands_maint",
    "processfork_cli.commands_server",
    "processfork_cli.commands_live",
    "processfork_cli.version",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)
