"""The engine's KV-cache groups, and which blocks of a sequence each group keeps.

vLLM's hybrid KV cache manager gives each kind of attention layer a block table of its own: a
model with sliding-window layers interleaved with full-attention layers has (at least) one
*group* per kind, all drawing blocks from one pool, and the layers of different groups share
the same KV tensors (block ``b`` of tensor ``j`` holds the ``j``-th layer of whichever group
owns block ``b``). So a page (one block of every distinct tensor) is the KV of one group's
layers, and a snapshot stores, per group, the blocks that group keeps:

- a full-attention group keeps every block of the sequence;
- a sliding-window group keeps only the blocks inside the window of the point a request resumes
  from: vLLM frees the older ones (its block table holds the null block there), and a prefix
  hit, warm or loaded, never reads them;
- a state group (Mamba and other state-space layers, vLLM's ``MambaSpec`` in its ``align``
  cache mode) keeps one block per block boundary, the state after exactly that many tokens
  (table slot ``p`` holds the state after ``(p + 1) * block_size`` tokens), and a prefix hit at
  ``B`` tokens reads the one state at ``B``: a snapshot stores that block, at the split point.

The layout this module describes is part of the engine fingerprint: pages of one layout are
meaningless in another. A single full-attention group is the plain layout: it is recorded as
nothing at all, so the fingerprints (and snapshots) of plain models are the same as before
groups were known. This module imports neither torch nor vLLM at import time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FULL_ATTENTION",
    "MAMBA",
    "SLIDING_WINDOW",
    "GroupLayout",
    "GroupSpec",
    "UnsupportedGroups",
    "group_job",
    "manifest_format",
]

FULL_ATTENTION = "full_attention"
SLIDING_WINDOW = "sliding_window"
MAMBA = "mamba"

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class UnsupportedGroups(ValueError):
    """The engine has a KV-cache group whose state the connector cannot snapshot."""


@dataclass(frozen=True)
class GroupSpec:
    """One KV-cache group: its kind, its window (sliding window only) and its model layers."""

    kind: str
    layers: tuple[int, ...]
    window: int | None = None
    #: A state group's per-layer state: each tensor's shape and dtype, in vLLM's order (for
    #: Mamba2, the convolution window then the SSM state).
    state: tuple[tuple[tuple[int, ...], str], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "layers": list(self.layers)}
        if self.window is not None:
            out["window"] = self.window
        if self.state is not None:
            out["state"] = [{"dtype": dtype, "shape": list(shape)} for shape, dtype in self.state]
        return out

    @property
    def is_state(self) -> bool:
        """Whether the group keeps a per-sequence state rather than per-token KV."""
        return self.kind == MAMBA

    def state_bytes(self) -> int:
        """Bytes of one layer's state: what a block of this group holds before its padding."""
        import math

        import torch

        return sum(math.prod(shape) * getattr(torch, dtype).itemsize
                   for shape, dtype in self.state or ())

    def first_kept(self, tokens: int, block_size: int) -> int:
        """The first block this group still holds once ``tokens`` tokens are computed: vLLM frees
        a sliding-window block when no later query can see it (``get_num_skipped_tokens``)."""
        if self.kind == MAMBA:
            return max(0, tokens // block_size - 1)
        if self.kind != SLIDING_WINDOW or self.window is None:
            return 0
        return max(0, tokens - self.window + 1) // block_size

    def stores_split(self, first: int, count: int, split: int, block_size: int) -> bool:
        """Whether a stored run of blocks ``[first, first + count)`` of this group holds what a
        request resuming at ``split`` tokens reads: a state group the state at ``split``
        exactly, any other group every block from the one it still holds there."""
        if self.kind == MAMBA:
            return split > 0 and count >= 1 and first <= split // block_size - 1 < first + count
        return first <= self.first_kept(split, block_size)


@dataclass(frozen=True)
class GroupLayout:
    """The groups of one engine, in vLLM's group order (the order of its block tables)."""

    groups: tuple[GroupSpec, ...]

    @classmethod
    def from_kv_cache_config(cls, kv_cache_config: Any) -> GroupLayout:
        """Read vLLM's ``KVCacheConfig``; groups of a kind we cannot snapshot raise."""
        from vllm.v1.kv_cache_interface import (
            FullAttentionSpec,
            MambaSpec,
            RSWASpec,
            SlidingWindowSpec,
            UniformTypeKVCacheSpecs,
        )

        if kv_cache_config is None:  # vLLM versions that build connectors without it
            return cls((GroupSpec(FULL_ATTENTION, ()),))
        groups = []
        for i, group in enumerate(kv_cache_config.kv_cache_groups):
            spec = group.kv_cache_spec
            specs = (
                list(spec.kv_cache_specs.values())
                if isinstance(spec, UniformTypeKVCacheSpecs) else [spec]
            )
            layers = tuple(_layer_index(n) for n in group.layer_names)
            if all(isinstance(s, SlidingWindowSpec) for s in specs) and len(
                {s.sliding_window for s in specs}
            ) == 1:
                groups.append(GroupSpec(SLIDING_WINDOW, layers, int(specs[0].sliding_window)))
            elif all(isinstance(s, FullAttentionSpec) and not isinstance(s, RSWASpec)
                     for s in specs):
                # A sliding-window layer vLLM turned into full attention (hybrid manager off)
                # keeps every block, so it is stored like one.
                groups.append(GroupSpec(FULL_ATTENTION, layers))
            elif len(specs) == 1 and isinstance(spec, MambaSpec):
                groups.append(_state_group(i, spec, layers))
            else:
                kinds = sorted({type(s).__name__ for s in specs})
                raise UnsupportedGroups(
                    f"ProcessForkConnector cannot snapshot KV-cache group {i} "
                    f"({', '.join(kinds)}; layers {list(layers)}): it supports full-attention "
                    "sliding-window and Mamba state groups"
                )
        if not groups:
            raise UnsupportedGroups("ProcessForkConnector needs a model with a KV cache")
        return cls(tuple(groups))

    @property
    def has_state(self) -> bool:
        """Whether some group keeps a per-sequence state (a Mamba group)."""
        return any(g.is_state for g in self.groups)

    @property
    def plain(self) -> bool:
        """One full-attention group: the layout of every model before groups were recorded."""
        return len(self.groups) == 1 and self.groups[0].kind == FULL_ATTENTION

    def to_fingerprint(self) -> list[dict[str, Any]] | None:
        """The fingerprint's ``kv_groups``: None for the plain layout (the field is left out)."""
        return None if self.plain else [g.to_json() for g in self.groups]

    @classmethod
    def from_fingerprint(cls, data: Sequence[dict[str, Any]] | None) -> GroupLayout:
        if not data:
            return cls((GroupSpec(FULL_ATTENTION, ()),))
        return cls(tuple(
            GroupSpec(str(g["kind"]), tuple(int(x) for x in g.get("layers", ())),
                      None if g.get("window") is None else int(g["window"]),
                      None if g.get("state") is None else tuple(
                          (tuple(int(n) for n in t["shape"]), str(t["dtype"]))
                          for t in g["state"]))
            for g in data
        ))

    def resume_blocks(self, stored: Sequence[Any], blocks: int, block_size: int) -> int:
        """How many of a stored sequence's first ``blocks`` blocks a request can resume after,
        given what each group stores (``stored``: each group's ``first`` and ``count``):
        ``blocks``, or fewer where a state group holds the state at an earlier split point (a
        session turn that ends on a block boundary stores the state a block before its end);
        0 where some group lacks what a request resuming there reads."""
        for part, spec in zip(stored, self.groups, strict=True):
            if spec.is_state and part.count == 1 and part.first + 1 < blocks:
                blocks = part.first + 1
        split = blocks * block_size
        if all(spec.stores_split(part.first, part.count, split, block_size)
               for part, spec in zip(stored, self.groups)):
            return blocks
        return 0

    def stored_ranges(self, num_tokens: int, block_size: int) -> list[tuple[int, int]]:
        """Per group, the blocks ``[first, end)`` a snapshot of ``num_tokens`` tokens stores.

        ``end`` covers the partial last block. A sliding-window group starts at the first block
        it still holds when a request resumes from the last whole block before the sequence's
        last token, the split point of a checkout (and of a warm prefix hit on it). A state
        group stores one block, the state at that split point (none when the split is 0).
        """
        end = -(-num_tokens // block_size)
        split = (num_tokens - 1) // block_size * block_size if num_tokens else 0
        ranges = []
        for g in self.groups:
            if g.is_state:
                at = split // block_size
                ranges.append((at - 1, at) if at else (0, 0))
            else:
                ranges.append((min(g.first_kept(split, block_size), end), end))
        return ranges


def _state_group(index: int, spec: Any, layers: tuple[int, ...]) -> GroupSpec:
    """A Mamba group, when its blocks are states at block boundaries that a prefix hit reads
    (prefix caching on: the ``align`` cache mode) and no speculative blocks trail them.

    vLLM 0.26 on CUDA picks its ``all`` mode for some hybrid models when prefix caching is on
    (every block keeps a state, blocks sized to the Mamba kernel's chunks); ``align`` is then
    one flag away, and is the only mode vLLM 0.32 has, so it is the one mode supported."""
    mode = getattr(spec, "mamba_cache_mode", None)
    if mode != "align" or getattr(spec, "num_speculative_blocks", 0):
        raise UnsupportedGroups(
            f"ProcessForkConnector cannot snapshot Mamba KV-cache group {index} (layers "
            f"{list(layers)}): it needs prefix caching on (the 'align' Mamba cache mode, got "
            f"{mode!r}) and no speculative decoding; start vLLM with --enable-prefix-caching "
            "--mamba-cache-mode align"
        )
    state = tuple((tuple(int(n) for n in shape), str(dtype).removeprefix("torch."))
                  for shape, dtype in zip(spec.shapes, spec.dtypes))
    return GroupSpec(MAMBA, layers, state=state)


def _layer_index(name: str) -> int:
    match = _LAYER_INDEX.search("." + name + ".")
    return int(match.group(1)) if match else -1


def group_job(job: str, group: int) -> str:
    """The job under which a snapshot saves one group's pages: group 0 keeps the snapshot's
    job id (its record is what the control plane watches), group ``g`` has ``<job>.g<g>``."""
    return job if group == 0 else f"{job}.g{group}"


def manifest_format(layout: GroupLayout | None) -> str:
    """The manifest format of a snapshot of an engine with this group layout (None: one
    full-attention group): grouped manifests name their groups, and those with a state group
    are of the newer format, which readers that know no states refuse."""
    from processfork.store.manifest import FORMAT, FORMAT_GROUPED, FORMAT_STATE

    if layout is None:
        return FORMAT
    return FORMAT_STATE if layout.has_state else FORMAT_GROUPED
