"""The resolved global options of one invocation and the handles built from them (store, client, output).

The app callback stores a `Settings` on the Typer context; each command calls `settings(ctx, ...)` with
the shared options it accepts after its name, and gets back the merged view.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from processfork_cli.options import DEFAULT_SERVER
from processfork_cli.output import Mode, Output

if TYPE_CHECKING:
    from processfork.store import Store

    from processfork_cli.client import Client

__all__ = ["Settings", "settings"]

@dataclass
class Settings:
    """Everything a command needs to know about where to read and how to write."""

    server: str = DEFAULT_SERVER
    store_path: Path | None = None
    api_key: str | None = None
    json: bool = False
    quiet: bool = False
    _output: Output | None = field(default=None, repr=False)

    @property
    def out(self) -> Output:
        if self._output is None:
            mode = Mode.JSON if self.json else Mode.QUIET if self.quiet else Mode.HUMAN
            self._output = Output(mode)
        return self._output

    @property
    def resolved_store_path(self) -> Path:
        if self.store_path is not None:
            return self.store_path.expanduser()
        from processfork.store import default_store_path  # $PF_STORE, else ~/.processfork

        return Path(default_store_path())

    @contextlib.contextmanager
    def open_store(self, *, readonly: bool = True) -> Iterator[Store]:
        """Open the store for one command; read-only opens never create a missing store."""
        from processfork.store import Store

        with Store(self.resolved_store_path, readonly=readonly) as store:
            yield store

    def client(self) -> Client:
        from processfork_cli.client import Client

        return Client(self.server, api_key=self.api_key)


def settings(ctx: Any, **given: Any) -> Settings:
    """Merge options given after the command name over the global ones from the callback.

    `ctx` is the Typer context (typed loosely so this module stays free of Typer); a `None` value means
    "not given here".
    """
    base = ctx.find_root().obj if ctx is not None else None
    if not isinstance(base, Settings):
        base = Settings()
    overrides: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        name = "store_path" if key == "store" else key
        overrides[name] = value
    if not overrides:
        return base
    return dataclasses.replace(base, _output=None, **overrides)
