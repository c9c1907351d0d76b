"""Small formatting helpers for the human mode: sizes, short cids, times, ref decorations."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from rich.text import Text

__all__ = [
    "SHORT_HEX",
    "decoration",
    "human_bytes",
    "human_count",
    "human_time",
    "short_cid",
]

SHORT_HEX = 12


def short_cid(cid: str | None, digits: int = SHORT_HEX) -> str:
    """`sha256:3f2a…` -> `3f2a9c1d2e4b`: what users type back as a prefix."""
    if not cid:
        return "-"
    return cid.removeprefix("sha256:")[:digits]


def human_bytes(n: float | None) -> str:
    """Binary units like `du -h`; exact bytes below 1 KiB."""
    if n is None:
        return "-"
    value = float(n)
    if abs(value) < 1024:
        return f"{int(value)} B"
    unit = "B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if abs(value) < 1024:
            break
    return f"{value:.1f} {unit}"


def human_count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def human_time(value: Any) -> str:
    """RFC 3339 strings and epoch seconds both become `YYYY-MM-DD HH:MM:SS` in UTC."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        when = dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
    else:
        text = str(value)
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return text
        if when.tzinfo is not None:
            when = when.astimezone(dt.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M:%S")


def decoration(refs: Sequence[str], *, head: bool, head_ref: str | None) -> Text:
    """`(HEAD -> main, base/1)` like `git log --decorate`; empty when nothing points here."""
    names = list(refs)
    parts: list[Text] = []
    if head:
        if head_ref and head_ref in names:
            names.remove(head_ref)
            parts.append(Text.assemble(("HEAD -> ", "bold cyan"), (head_ref, "bold green")))
        else:
            parts.append(Text("HEAD", style="bold cyan"))
    parts.extend(Text(name, style="green") for name in names)
    if not parts:
        return Text()
    return Text("(") + Text(", ").join(parts) + Text(")")
