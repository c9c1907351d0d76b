"""Typer's Rich help formatter, imported without the two modules `pf`'s help never uses.

`typer.rich_utils` imports `rich.markdown` (markdown-it and pygments, about 70 ms of `pf --help`
on a 2-core VM) for the "markdown" markup mode, and `rich.traceback` (about 40 ms) for pretty
exceptions. `pf` uses neither: its markup mode is "rich" and pretty exceptions are off. `load()`
imports the formatter with a stand-in for each of those two classes. The first use of a stand-in
(a call, or any attribute) imports the real class and hands over to it, so the help is the same.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["DEFERRED", "load"]

# module -> the one name typer.rich_utils imports from it
DEFERRED: dict[str, str] = {"rich.markdown": "Markdown", "rich.traceback": "Traceback"}


class _StandIn(type):
    """Metaclass of a stand-in: calling it or reading an attribute uses the real class."""

    def _real(cls) -> type:
        return getattr(importlib.import_module(cls.__module__), cls.__name__)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real()(*args, **kwargs)

    def __getattr__(cls, name: str) -> Any:
        return getattr(cls._real(), name)


def load() -> None:
    """Import `typer.rich_utils`, deferring `DEFERRED` until something uses them.

    The stand-in modules are in `sys.modules` only while typer's module is imported, so any later
    `import rich.markdown` loads the real module. Nothing is deferred once typer's formatter or the
    real modules are loaded.
    """
    if "typer.rich_utils" in sys.modules:
        return
    stand_ins: dict[str, types.ModuleType] = {}
    for module, name in DEFERRED.items():
        if module not in sys.modules:
            stand_in = types.ModuleType(module)
            setattr(stand_in, name, _StandIn(name, (), {"__module__": module}))
            stand_ins[module] = stand_in
    sys.modules.update(stand_ins)
    try:
        importlib.import_module("typer.rich_utils")
    finally:
        for module, stand_in in stand_ins.items():
            if sys.modules.get(module) is stand_in:
                del sys.modules[module]
