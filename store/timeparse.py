"""Ages as users type them for `gc --prune` / `--expire` (git-like: `now`, `10m`, `2.weeks.ago`)."""

from __future__ import annotations

import math
import re

from processfork.store.errors import InvalidAge

__all__ = ["parse_age"]

_UNITS = {
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
    "mo": 2592000.0, "month": 2592000.0, "months": 2592000.0,
    "y": 31536000.0, "year": 31536000.0, "years": 31536000.0,
}  # fmt: skip
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*\.?\s*([a-z]+)")


def parse_age(age: str | float) -> float:
    """Seconds for `now`, `never`, a number of seconds, or unit terms such as `1h30m` / `2.weeks`.

    `never` is infinity, so `expire=parse_age("never")` keeps every reflog entry.
    """
    if isinstance(age, bool):
        raise InvalidAge(str(age))
    if isinstance(age, (int, float)):
        if math.isnan(age) or age < 0:
            raise InvalidAge(str(age))
        return float(age)
    text = str(age).strip().lower()
    text = text.removesuffix(".ago").removesuffix(" ago").strip()
    if text in ("now", "0"):
        return 0.0
    if text in ("never", "inf", "infinity"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isnan(value) or value < 0:
            raise InvalidAge(str(age))
        return value
    total, pos = 0.0, 0
    compact = text.replace(" ", "")
    for match in _PART.finditer(compact):
        if match.start() != pos or match.group(2) not in _UNITS:
            raise InvalidAge(str(age))
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
        if pos < len(compact) and compact[pos] == ".":
            pos += 1
    if pos != len(compact) or pos == 0:
        raise InvalidAge(str(age))
    return total
