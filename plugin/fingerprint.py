"""Engine fingerprints: everything that must match for stored pages to be loadable.

A page is raw bytes in one engine's layout.  Loading it into an engine that differs
in any of these fields would not fail loudly; it would silently compute garbage (or
lose bit-exactness).  So checkout compares every field and refuses on the first
difference, naming it.

Pages of one KV head each (format v4) have the same bytes at every tensor-parallel size: for
them the TP size is recorded, not required, and between two TP sizes the thread count is not
either (the reduction order differs anyway, so such a restore is close, not bit-identical).
Whole-block pages of a TP-1 engine hold every head of a block, so they load at any TP size too:
each rank takes its own heads' rows of every page (``loads_at_any_tp``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FINGERPRINT_FIELDS",
    "HEAD_PAGE_FIELDS",
    "Fingerprint",
    "Mismatch",
    "config_hash",
    "describe_groups",
    "loads_at_any_tp",
]

#: Compared in this order; the first differing field is the one reported. ``device`` is
#: recorded but not compared: ``backend`` and ``layout`` already say what it decides.
FINGERPRINT_FIELDS: tuple[str, ...] = (
    "model",
    "model_config_hash",
    "kv_groups",
    "kv_dtype",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "block_size",
    "backend",
    "isa",
    "layout",
    "tp_size",
    "batch_invariant",
    "threads",
    "vllm_version",
)
#: What decides the bytes of one KV head's page: compared when a snapshot of pages of one KV
#: head is loaded at another TP size.
HEAD_PAGE_FIELDS: tuple[str, ...] = tuple(f for f in FINGERPRINT_FIELDS
                                          if f not in ("tp_size", "threads"))


def loads_at_any_tp(manifest_format: Any, stored: Mapping[str, Any]) -> bool:
    """Whether a snapshot's pages load at a TP size other than the one that wrote them: pages of
    one KV head (format v4) always do, and whole-block pages do when a TP-1 engine wrote them,
    since each holds every head of its block."""
    from processfork.store.manifest import FORMAT_HEADS

    return manifest_format == FORMAT_HEADS or stored.get("tp_size") == 1


@dataclass(frozen=True)
class Mismatch:
    """The first fingerprint field in which a snapshot and an engine differ."""

    field: str
    stored: Any
    engine: Any


@dataclass(frozen=True)
class Fingerprint:
    """One engine's fingerprint, as its worker computes it (engine_info.py).

    Snapshots store it as a JSON object (``to_json``), with sorted keys like every stored
    record, and ``GET /status`` shows it so: the fields are in that order here too.
    """

    backend: str
    batch_invariant: bool
    block_size: int
    device: str
    head_dim: int
    #: The CPU attention backend's instruction set; None on a GPU.
    isa: str | None
    kv_dtype: str
    layout: str
    #: vLLM's served model name.
    model: str
    model_config_hash: str
    #: The model's KV heads, not one rank's share: pages of one head name them by this index.
    num_kv_heads: int
    num_layers: int
    #: The worker's compute threads on a CPU; None on a GPU.
    threads: int | None
    tp_size: int
    vllm_version: str
    #: The KV-cache groups (plugin/kv_groups.py) when they are not one full-attention group.
    #: None is left out of the JSON, so a plain model's fingerprint is what it was before
    #: groups were recorded, and its older snapshots still match it.
    kv_groups: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["kv_groups"] is None:
            del out["kv_groups"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fingerprint:
        return cls(**{f.name: data[f.name] if f.name in data or f.default is dataclasses.MISSING
                      else f.default for f in dataclasses.fields(cls)})

    def first_mismatch(self, stored: Mapping[str, Any], *,
                       any_tp: bool = False) -> Mismatch | None:
        """The first field in which a snapshot's stored fingerprint differs from this one; a field
        the snapshot lacks differs. ``any_tp``: the snapshot's pages load at any TP size
        (``loads_at_any_tp``), so another TP size (and with it another thread count) is no
        mismatch."""
        fields = FINGERPRINT_FIELDS
        if any_tp and stored.get("tp_size") != self.tp_size:
            fields = HEAD_PAGE_FIELDS
        for name in fields:
            if stored.get(name) != getattr(self, name):
                if name == "kv_groups":  # say it in words: `None` would name nothing
                    return Mismatch(name, describe_groups(stored.get(name)),
                                    describe_groups(self.kv_groups))
                return Mismatch(name, stored.get(name), getattr(self, name))
        return None


def describe_groups(groups: Any) -> str:
    """A fingerprint's ``kv_groups`` for people: ``"sliding_window(64) layers [0, 2] +
    full_attention layers [1, 3]"``; absent means one full-attention group."""
    if not groups:
        return "one full_attention group"
    if not isinstance(groups, list):
        return repr(groups)
    parts = []
    for g in groups:
        if not isinstance(g, Mapping):
            parts.append(repr(g))
            continue
        window = f"({g['window']})" if g.get("window") is not None else ""
        parts.append(f"{g.get('kind')}{window} layers {list(g.get('layers') or [])}")
    return " + ".join(parts)


def config_hash(hf_config_dict: dict[str, Any]) -> str:
    """Hash of a model config, ignoring fields that name where it was loaded from."""
    cleaned = {
        k: v
        for k, v in hf_config_dict.items()
        if not k.startswith("_") and k not in ("transformers_version",)
    }
    blob = json.dumps(cleaned, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
