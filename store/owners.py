"""Who holds a pin, and whether that process still lives.

A pin protects the objects of a snapshot in progress. When its writer is killed mid-snapshot, the
pin would protect them for a day (`PIN_STALE_SECONDS`), because nothing knew the writer had died.
So every new pin records its owner: the boot of the machine, the PID namespace, the PID and the
process's start time (in clock ticks since boot, from /proc). gc drops the pin of an owner that is
certainly dead at once:

- the machine has booted since (another boot id): every process of that boot is gone;
- same boot and PID namespace, and no process has that PID, or one has it with another start time
  (the PID was reused).

Where the answer cannot be known (another PID namespace, e.g. a server in a container beside a gc
on the host, or a system without /proc), the owner counts as alive and the day-long staleness
still applies. A wrong "dead" would let gc delete pages of a live writer; a wrong "alive" only
delays reclaiming space. The check errs on the side of alive.
"""

from __future__ import annotations

import enum
import os
import struct
import uuid
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Liveness", "Owner", "current_owner", "liveness"]

_RECORD = struct.Struct("<16sQQQ")  # boot id, PID namespace inode, PID, start time (clock ticks)
_NO_BOOT = bytes(16)


class Liveness(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Owner:
    """A process, named so that it can be told apart from a later one with the same PID."""

    boot_id: bytes
    pid_namespace: int
    pid: int
    start_ticks: int

    SIZE = _RECORD.size

    def pack(self) -> bytes:
        return _RECORD.pack(self.boot_id, self.pid_namespace, self.pid, self.start_ticks)

    @classmethod
    def unpack(cls, raw: bytes) -> Owner:
        return cls(*_RECORD.unpack(bytes(raw[: _RECORD.size])))

    def describe(self) -> str:
        return f"pid {self.pid}"


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return _NO_BOOT


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def start_ticks(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot); None when there is no such
    process (a zombie, killed and not yet reaped, counts as none). 0 when /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    # The command name (field 2) is in parentheses and may hold spaces or ')': split after the
    # last one. Field 22 (starttime) is then the 20th.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[:1] in ([b"Z"], [b"X"]):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


@lru_cache(maxsize=4)
def _owner_of(pid: int) -> Owner:
    return Owner(_boot_id(), _pid_namespace(), pid, start_ticks(pid) or 0)


def current_owner() -> Owner:
    """This process (keyed by PID, so a forked child is its own owner)."""
    return _owner_of(os.getpid())


def liveness(owner: Owner | None) -> Liveness:
    """Whether `owner` still runs, as far as this process can know."""
    if owner is None:
        return Liveness.UNKNOWN
    me = current_owner()
    if owner.boot_id == _NO_BOOT or me.boot_id == _NO_BOOT:
        return Liveness.UNKNOWN
    if owner.boot_id != me.boot_id:
        return Liveness.DEAD
    if owner.pid_namespace == 0 or owner.pid_namespace != me.pid_namespace:
        return Liveness.UNKNOWN
    started = start_ticks(owner.pid)
    if started is None:
        return Liveness.DEAD
    if started == 0 or owner.start_ticks == 0:
        return Liveness.UNKNOWN
    return Liveness.ALIVE if started == owner.start_ticks else Liveness.DEAD
