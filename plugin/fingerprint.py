"""Engine fingerprints: everything that must match for stored pages to be loadable.

A page is raw bytes in one engine's layout.  Loading it into an engine that differs
in any of these fields would not fail loudly; it would silently compute garbage (or
lose bit-exactness).  So checkout compares every field and refuses on the first
difference, naming it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["FINGERPRINT_FIELDS", "config_hash", "first_mismatch"]

#: Compared in this order; the first differing field is the one reported.
FINGERPRINT_FIELDS: tuple[str, ...] = (
    "model",
    "model_config_hash",
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


def config_hash(hf_config_dict: dict[str, Any]) -> str:
    """Hash of a model config, ignoring fields that name where it was loaded from."""
    cleaned = {
        k: v
        for k, v in hf_config_dict.items()
        if not k.startswith("_") and k not in ("transformers_version",)
    }
    blob = json.dumps(cleaned, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def first_mismatch(
    stored: dict[str, Any], engine: dict[str, Any]
) -> tuple[str, Any, Any] | None:
    """The first field where a snapshot's fingerprint differs from the engine's."""
    for name in FINGERPRINT_FIELDS:
        if stored.get(name) != engine.get(name):
            return name, stored.get(name), engine.get(name)
    return None
