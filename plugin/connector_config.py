"""The connector's `kv_connector_extra_config`, parsed once, without importing torch or vLLM.

The API server process needs the store path too (routes.py), and must not pay for the connector's
imports to learn it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from processfork.store import default_store_path

__all__ = ["PAGE_READERS", "ConnectorConfig", "store_path_from_config"]

#: ``page_reader`` values; the first is the default.
PAGE_READERS = ("auto", "map", "pread")


def store_path_from_config(extra: dict[str, Any]) -> str:
    """The store directory: extra config ``store``, else the store's default (``$PF_STORE``,
    else ``~/.processfork``), made absolute: the server's processes may not share a directory."""
    path = extra.get("store") or default_store_path()
    return os.path.abspath(os.path.expanduser(str(path)))


def _flag(extra: dict[str, Any], name: str, default: bool = True) -> bool:
    value = extra.get(name)
    return default if value is None else str(value).lower() not in ("0", "false", "no")


def _optional_flag(extra: dict[str, Any], name: str) -> bool | None:
    """A flag the user may leave unset, where unset means "the default for this engine"."""
    return None if extra.get(name) is None else _flag(extra, name)


def _positive_int(extra: dict[str, Any], name: str) -> int | None:
    value = extra.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"kv_connector_extra_config.{name} must be a positive integer "
                         f"(got {value!r})")
    return int(value)


def _choice(extra: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``; the first (the default) when unset."""
    value = extra.get(name)
    if value is None or value == "":
        return choices[0]
    if str(value) not in choices:
        raise ValueError(f"kv_connector_extra_config.{name} must be one of "
                         f"{', '.join(choices)} (got {value!r})")
    return str(value)


def _count(extra: dict[str, Any], name: str) -> int:
    """A size where 0 (the default) means off."""
    value = extra.get(name)
    if value is None or str(value) == "0":
        return 0
    return _positive_int(extra, name) or 0


@dataclass(frozen=True)
class ConnectorConfig:
    """What `--kv-transfer-config '{"kv_connector_extra_config": {...}}'` can set (docs/gpu.md)."""

    store: str
    verify_loads: bool = True
    pipelined_loads: bool = True
    page_path: str = "auto"
    staging_mib: int | None = None
    #: Slots the staging memory is cut into (chunks in flight at once).
    staging_slots: int | None = None
    copy_threads: int | None = None
    #: How the staged path's copy threads take pages from the store: ``map`` (copied out of the
    #: store's memory map, hashed as they go, written past the CPU's caches) or ``pread``;
    #: ``auto`` picks (``staged_pages.default_page_reader``).
    page_reader: str = "auto"
    #: Whether copies out of the map write past the CPU's caches; None: the path's default.
    streaming_stores: bool | None = None
    host_tier_mib: int = 0
    host_tier_dir: str = "/dev/shm"
    #: Load a client request's stored prefix from the store on a prefix-cache miss.
    auto_restore: bool = True
    #: Commit each turn of a request that names a session to the ref ``<session_prefix>NAME``.
    #: None (unset): on at TP size 1, off above it (``sessions_at``).
    sessions: bool | None = None
    session_prefix: str = "sessions/"
    #: A remote (s3://BUCKET/PREFIX) a checkout, or a transparent restore, fetches snapshots
    #: the store lacks from (`pf serve --remote`).
    remote: str | None = None
    #: How often EngineCore re-reads the remote's prefix records (transparent restores
    #: through the remote), in seconds.
    remote_refresh_s: int = 30

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        return cls(
            store=store_path_from_config(extra),
            verify_loads=_flag(extra, "verify_loads"),
            pipelined_loads=_flag(extra, "pipelined_loads"),
            page_path=str(extra.get("page_path") or "auto"),
            staging_mib=_positive_int(extra, "staging_mib"),
            staging_slots=_positive_int(extra, "staging_slots"),
            copy_threads=_positive_int(extra, "copy_threads"),
            page_reader=_choice(extra, "page_reader", PAGE_READERS),
            streaming_stores=_optional_flag(extra, "streaming_stores"),
            host_tier_mib=_count(extra, "host_tier_mib"),
            host_tier_dir=os.path.expanduser(str(extra.get("host_tier_dir") or "/dev/shm")),
            auto_restore=_flag(extra, "auto_restore"),
            sessions=_optional_flag(extra, "sessions"),
            session_prefix=str(extra.get("session_prefix") or "sessions/"),
            remote=str(extra["remote"]) if extra.get("remote") else None,
            remote_refresh_s=_positive_int(extra, "remote_refresh_s") or 30,
        )

    def sessions_at(self, tp_size: int) -> bool:
        """Whether session turns are committed on an engine of ``tp_size`` ranks. A turn's
        windows are saved after its request ends as whole-block pages, which no rank of a
        tensor-parallel engine holds: sessions are off there unless asked for, and asking is an
        error, not a server that silently commits nothing."""
        if tp_size == 1:
            return self.sessions is not False
        if self.sessions:
            raise ValueError(
                f"ProcessForkConnector: sessions are not supported at tensor_parallel_size="
                f'{tp_size}; remove "sessions": true from kv_connector_extra_config'
            )
        return False
