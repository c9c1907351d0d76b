"""Option and argument types shared by every command, so each is spelled the same way everywhere.

The global options (`pf --json log`) are also accepted after the command (`pf log --json`): a command
declares the aliases it honours and passes them to `settings()`, where a value given on the command
wins over the global one. Defaults are `None` so "not given" is distinguishable from "given".
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = [
    "DEFAULT_SERVER",
    "ApiKeyOpt",
    "GlobalApiKeyOpt",
    "GlobalServerOpt",
    "GlobalStoreOpt",
    "JsonOpt",
    "QuietOpt",
    "RevArg",
    "RevOptionalArg",
    "ServerOpt",
    "StoreOpt",
    "ViaServerOpt",
]

DEFAULT_SERVER = "http://127.0.0.1:8000"

_GLOBAL = "Global options"

def _server_option(*, env: bool) -> typer.models.OptionInfo:
    return typer.Option(
        "--server",
        envvar="PF_SERVER" if env else None,
        metavar="URL",
        help="Base URL of the vLLM server with the processfork plugin"
        + ("." if env else " (env PF_SERVER)."),
        show_default=DEFAULT_SERVER,
        rich_help_panel=_GLOBAL,
    )


def _store_option(*, env: bool) -> typer.models.OptionInfo:
    return typer.Option(
        "--store",
        envvar="PF_STORE" if env else None,
        metavar="DIR",
        help="Store directory" + ("." if env else " (env PF_STORE)."),
        show_default="~/.processfork",
        rich_help_panel=_GLOBAL,
    )


def _api_key_option(*, env: bool) -> typer.models.OptionInfo:
    return typer.Option(
        "--api-key",
        envvar="PF_API_KEY" if env else None,
        metavar="KEY",
        help="API key the server was started with, sent as `Authorization: Bearer`"
        + ("." if env else " (env PF_API_KEY)."),
        show_default=False,
        rich_help_panel=_GLOBAL,
    )


# The app callback's options read the environment; the per-command copies must not, or PF_STORE
# would silently override `pf --store DIR log`. Settings() merges them: command > global > env.
GlobalServerOpt = Annotated[str | None, _server_option(env=True)]
GlobalStoreOpt = Annotated[Path | None, _store_option(env=True)]
GlobalApiKeyOpt = Annotated[str | None, _api_key_option(env=True)]

ServerOpt = Annotated[str | None, _server_option(env=False)]
StoreOpt = Annotated[Path | None, _store_option(env=False)]
ApiKeyOpt = Annotated[str | None, _api_key_option(env=False)]

JsonOpt = Annotated[
    bool | None,
    typer.Option(
        "--json",
        help="Write the result as JSON on stdout.",
        show_default=False,
        rich_help_panel=_GLOBAL,
    ),
]

QuietOpt = Annotated[
    bool | None,
    typer.Option(
        "--quiet",
        "-q",
        help="Print only ids (cids, ref names), no narration.",
        show_default=False,
        rich_help_panel=_GLOBAL,
    ),
]

ViaServerOpt = Annotated[
    bool,
    typer.Option(
        "--via-server",
        help="Go through the server's HTTP API instead of opening the store (store on another machine).",
    ),
]

RevArg = Annotated[
    str,
    typer.Argument(
        metavar="REV",
        help="A cid (sha256:… or bare hex), a unique hex prefix of 7+ digits, a ref name, HEAD or REF~N.",
        show_default=False,
    ),
]

RevOptionalArg = Annotated[
    str | None,
    typer.Argument(
        metavar="REV",
        help="A cid, a unique hex prefix of 7+ digits, a ref name, HEAD or REF~N.",
        show_default="HEAD",
    ),
]
