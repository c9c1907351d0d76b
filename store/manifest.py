"""The snapshot manifest: the commit object of the store, and its canonical stored form.

In memory a sequence lists its page pairs inline (what the engine and the CLI work with). On disk each
sequence's page list is a content-addressed *page table* blob (32 bytes per block: K digest, V digest),
so a fork child, which shares its parent's pages, also shares its page tables and costs O(1) bytes
instead of O(blocks). The cid is the sha256 of the stored form, which is a pure function of the
in-memory form: computing a cid never needs the store.

A model whose KV cache has several groups (vLLM's hybrid KV cache manager: sliding-window layers
beside full-attention ones) stores, per sequence, the blocks each group keeps. Such a manifest has
the format `FORMAT_GROUPED`: its sequences say which blocks of which group their page table holds,
one group after the other in one table, so everything that follows page tables (gc, fsck, remotes)
reads it as it reads any other. A group that keeps a per-sequence state (Mamba layers) stores one
block, the state at the sequence's split point, marked `state` in a manifest of the format
`FORMAT_STATE`, which stores that know no states refuse (docs/format.md). A session turn's sequence
may leave its partial last block without a page (`paged_tokens`): its page table then simply ends
one block early.

A manifest of the format `FORMAT_HEADS` stores one K page and one V page per block and per KV head
(`heads` pairs per block in its page tables): an engine that runs its attention over several
tensor-parallel ranks holds only some heads of every block, and pages of one head each let every
rank save and load its own heads, whatever the TP size of the engine that wrote them.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from processfork.store.digest import (
    canonical_json,
    cid_of,
    digest_from_hex,
    is_cid,
    page_digest,
)
from processfork.store.errors import InvalidDigest, StoreError, UnsupportedFormat

__all__ = [
    "FORMAT",
    "FORMATS",
    "FORMAT_GROUPED",
    "FORMAT_HEADS",
    "FORMAT_STATE",
    "GROUPED_FORMATS",
    "ForkInfo",
    "InvalidManifest",
    "Manifest",
    "PageGroup",
    "SnapshotSequence",
    "TokenRef",
    "decode_page_table",
    "encode_page_table",
    "parse_head",
    "stored_sequences",
    "utc_now",
]

FORMAT = "paged-batchinvariant-v1"
#: Manifests whose sequences hold the pages of several KV-cache groups (docs/format.md).
FORMAT_GROUPED = "paged-batchinvariant-v2"
#: Grouped manifests of which some group holds a per-sequence state (a Mamba group).
FORMAT_STATE = "paged-batchinvariant-v3"
#: Manifests whose pages hold one KV head each (``heads`` page pairs per block), whatever the
#: tensor-parallel size of the engine that wrote them; their sequences may have groups.
FORMAT_HEADS = "paged-batchinvariant-v4"
FORMATS = (FORMAT, FORMAT_GROUPED, FORMAT_STATE, FORMAT_HEADS)
#: Formats whose sequences always have groups (a v4 sequence may or may not).
GROUPED_FORMATS = (FORMAT_GROUPED, FORMAT_STATE)
_TABLE_ENTRY = 32  # bytes per entry in a page table: 16-byte K digest + 16-byte V digest
_OPTIONAL = {"groups", "heads", "paged_tokens"}  # sequence fields only some manifests have


class InvalidManifest(StoreError, ValueError):
    """A manifest dict or object does not have the fields and types of the format."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return f"invalid manifest: {self.detail}"


def utc_now() -> str:
    """RFC 3339 UTC with microseconds, e.g. `2026-11-30T08:12:01.123456Z` (sorts as text)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_hex(value: Any, what: str) -> str:
    try:
        digest_from_hex(value)
    except InvalidDigest:
        raise InvalidManifest(f"{what} must be 32 lowercase hex digits, got {value!r}") from None
    return value


_HEX_DIGESTS = re.compile(r"(?:[0-9a-f]{32})*")


def _check_pages(pages: Sequence[Any]) -> None:
    """Every entry a [k, v] pair of 32-hex-digit digests. One pattern match over all of them
    when they are well formed (a 32K-token snapshot has thousands, checked on every write);
    the entry at fault named otherwise."""
    if (all(type(pair) in (tuple, list) and len(pair) == 2 for pair in pages)
            and all(type(d) is str and len(d) == 32 for pair in pages for d in pair)
            and _HEX_DIGESTS.fullmatch("".join(d for pair in pages for d in pair))):
        return
    for pair in pages:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InvalidManifest(f"a page entry is a [k, v] pair, got {pair!r}")
        _check_hex(pair[0], "page digest")
        _check_hex(pair[1], "page digest")


def _check_count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidManifest(f"{what} must be a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ForkInfo:
    """Which of `of` siblings a fork child is (0-based `index`)."""

    index: int
    of: int

    def to_dict(self) -> dict[str, int]:
        return {"index": self.index, "of": self.of}

    @classmethod
    def from_dict(cls, d: Any) -> ForkInfo:
        if not isinstance(d, Mapping) or set(d) != {"index", "of"}:
            raise InvalidManifest(f"fork must be {{index, of}} or null, got {d!r}")
        index, of = _check_count(d["index"], "fork.index"), _check_count(d["of"], "fork.of")
        if index >= of:
            raise InvalidManifest(f"fork.index {index} must be below fork.of {of}")
        return cls(index, of)


@dataclass(frozen=True)
class TokenRef:
    """A token id array stored as a blob (int32 little-endian), with its length."""

    digest: str
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "digest": self.digest}

    @classmethod
    def from_dict(cls, d: Any, what: str = "tokens") -> TokenRef:
        if not isinstance(d, Mapping) or set(d) != {"digest", "count"}:
            raise InvalidManifest(f"{what} must be {{digest, count}}, got {d!r}")
        return cls(
            _check_hex(d["digest"], f"{what}.digest"), _check_count(d["count"], f"{what}.count")
        )


def encode_page_table(pages: list[tuple[str, str]]) -> bytes:
    """The stored page table: per block the 16-byte K digest then the 16-byte V digest."""
    return bytes.fromhex("".join(k + v for k, v in pages))


def decode_page_table(table: bytes) -> list[tuple[str, str]]:
    if len(table) % _TABLE_ENTRY:
        raise InvalidManifest(f"page table of {len(table)} bytes is not a multiple of 32")
    h = bytes(table).hex()
    return [(h[i : i + 32], h[i + 32 : i + 64]) for i in range(0, len(h), 64)]


@dataclass(frozen=True)
class PageGroup:
    """The blocks ``first .. first + count - 1`` of one KV-cache group, in a grouped sequence's
    page list: the groups' pages follow each other in group order. ``state``: the group keeps
    a per-sequence state, and its one block (if any) is the state after ``(first + 1) *
    block_size`` tokens (a `paged-batchinvariant-v3` manifest)."""

    first: int
    count: int
    state: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "first": self.first}
        if self.state:
            out["state"] = True
        return out

    @classmethod
    def from_dict(cls, d: Any) -> PageGroup:
        if not isinstance(d, Mapping) or set(d) - {"state"} != {"first", "count"}:
            raise InvalidManifest(f"a page group is {{first, count}} (and state), got {d!r}")
        state = d.get("state", False)
        if state not in (False, True) or ("state" in d and state is not True):
            raise InvalidManifest(f"a page group's state is true or absent, got {state!r}")
        group = cls(_check_count(d["first"], "group.first"),
                    _check_count(d["count"], "group.count"), bool(state))
        if group.state and group.count > 1:
            raise InvalidManifest(f"a state group stores at most one block, got {group.count}")
        return group


def _parse_groups(value: Any) -> list[PageGroup]:
    if not isinstance(value, list) or not value:
        raise InvalidManifest("sequence.groups must be a non-empty list of {first, count}")
    return [PageGroup.from_dict(g) for g in value]


def _check_heads(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidManifest(f"sequence.heads must be a positive integer, got {value!r}")
    return value


def _check_paged(value: Any, count: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
        raise InvalidManifest(f"sequence.paged_tokens must be an integer from 0 to below its "
                              f"{count} tokens, got {value!r}")
    return value


@dataclass
class SnapshotSequence:
    """One sequence: its token ids (by reference) and one (K, V) page digest pair per block.

    ``groups`` is None for a model with one KV-cache group: ``pages`` then has every block.
    Otherwise ``pages`` holds each group's stored blocks in turn, as ``groups`` says.

    ``paged_tokens`` is None when every block has its pages. A session turn records every token
    the engine computed but stores no page for its partial last block (a checkout never loads
    it, and the next turn stores that block whole): it then says how many leading tokens, whole
    blocks only, have pages.

    ``heads`` is None when a page pair holds every KV head of its block (formats v1-v3). In a
    `paged-batchinvariant-v4` manifest it is the model's KV head count, and ``pages`` holds
    ``heads`` pairs per block, head by head: entry ``b * heads + h`` is head ``h`` of the
    ``b``-th stored block.
    """

    tokens: TokenRef
    pages: list[tuple[str, str]] = field(default_factory=list)
    groups: list[PageGroup] | None = None
    paged_tokens: int | None = None
    heads: int | None = None

    @property
    def tokens_with_pages(self) -> int:
        """The leading tokens whose blocks have pages."""
        return self.tokens.count if self.paged_tokens is None else self.paged_tokens

    @property
    def pairs_per_block(self) -> int:
        """Page pairs per stored block: one, or one per KV head."""
        return 1 if self.heads is None else self.heads

    @property
    def num_blocks(self) -> int:
        """Stored blocks, over every group."""
        return len(self.pages) // self.pairs_per_block

    def block_pages(self) -> list[list[tuple[str, str]]]:
        """The page pairs of each stored block, in page-table order (one pair per head)."""
        n = self.pairs_per_block
        return [self.pages[i : i + n] for i in range(0, len(self.pages), n)]

    def validate(self) -> None:
        if not isinstance(self.tokens, TokenRef):
            raise InvalidManifest("sequence.tokens must be a TokenRef")
        TokenRef.from_dict(self.tokens.to_dict())
        if self.paged_tokens is not None:
            _check_paged(self.paged_tokens, self.tokens.count)
        _check_pages(self.pages)
        if self.heads is not None:
            _check_heads(self.heads)
            if len(self.pages) % self.heads:
                raise InvalidManifest(f"{len(self.pages)} page pairs are not whole blocks of "
                                      f"{self.heads} heads")
        if self.groups is not None:
            groups = _parse_groups([g.to_dict() for g in self.groups])
            if sum(g.count for g in groups) != self.num_blocks:
                raise InvalidManifest(
                    f"the groups count {sum(g.count for g in groups)} blocks, the sequence "
                    f"has {self.num_blocks}"
                )

    def group_pages(self, group: int) -> tuple[int, list[tuple[str, str]]]:
        """Group ``group``'s first stored block and its pages (group 0 of an ungrouped
        sequence: every block), ``pairs_per_block`` pairs per block."""
        if self.groups is None:
            if group != 0:
                raise InvalidManifest(f"the sequence has one KV-cache group, not {group + 1}")
            return 0, self.pages
        if not 0 <= group < len(self.groups):
            raise InvalidManifest(f"the sequence has {len(self.groups)} KV-cache groups, "
                                  f"not {group + 1}")
        n = self.pairs_per_block
        start = sum(g.count for g in self.groups[:group]) * n
        g = self.groups[group]
        return g.first, self.pages[start : start + g.count * n]

    def page_table(self) -> bytes:
        return encode_page_table(self.pages)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pages": [[k, v] for k, v in self.pages],
                               "tokens": self.tokens.to_dict()}
        if self.groups is not None:
            out["groups"] = [g.to_dict() for g in self.groups]
        if self.paged_tokens is not None:
            out["paged_tokens"] = self.paged_tokens
        if self.heads is not None:
            out["heads"] = self.heads
        return out

    @classmethod
    def from_dict(cls, d: Any) -> SnapshotSequence:
        if not isinstance(d, Mapping) or set(d) - _OPTIONAL != {"tokens", "pages"}:
            raise InvalidManifest(f"a sequence is {{tokens, pages}}, got keys {sorted(d)!r}")
        if not isinstance(d["pages"], list):
            raise InvalidManifest("sequence.pages must be a list of [k, v] pairs")
        groups = _parse_groups(d["groups"]) if "groups" in d else None
        seq = cls(TokenRef.from_dict(d["tokens"]), [tuple(p) for p in d["pages"]], groups,  # type: ignore[misc]
                  d.get("paged_tokens"), d.get("heads"))
        seq.validate()
        return seq


@dataclass(kw_only=True)
class Manifest:
    """A snapshot: what the engine held, where it came from, and what must match to load it."""

    format: str = FORMAT
    name: str
    parents: list[str] = field(default_factory=list)
    fork: ForkInfo | None = None
    created: str = field(default_factory=utc_now)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    sequences: list[SnapshotSequence] = field(default_factory=list)

    # -- derived values -------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return sum(s.tokens.count for s in self.sequences)

    def page_digests(self) -> set[str]:
        """Every page digest (hex) any sequence uses, K and V alike."""
        return {d for s in self.sequences for pair in s.pages for d in pair}

    def page_keys(self) -> set[bytes]:
        """`page_digests()` as 16-byte LMDB keys."""
        return {bytes.fromhex(d) for d in self.page_digests()}

    def page_tables(self) -> dict[str, bytes]:
        """The page table blobs of the stored form, by their hex digest."""
        tables = (s.page_table() for s in self.sequences)
        return {page_digest(t).hex(): t for t in tables}

    @property
    def store_version(self) -> int:
        """The store format version a store holding this manifest declares: 2 for a grouped
        manifest or a sequence whose tail has no page, which version-1 readers would misread;
        3 for states; 4 for pages of one KV head."""
        if self.format == FORMAT_HEADS:
            return 4
        if self.format == FORMAT_STATE:
            return 3
        if self.format == FORMAT_GROUPED or any(s.paged_tokens is not None
                                                for s in self.sequences):
            return 2
        return 1

    def blob_digests(self) -> set[str]:
        """Every blob the stored form needs: token arrays and page tables."""
        return {s.tokens.digest for s in self.sequences} | set(self.page_tables())

    # -- validation and the stored form ---------------------------------------------------
    def validate(self) -> None:
        if self.format not in FORMATS:
            raise UnsupportedFormat(str(self.format))
        if not isinstance(self.name, str) or not self.name:
            raise InvalidManifest("name must be a non-empty string")
        if not isinstance(self.parents, list) or not all(is_cid(p) for p in self.parents):
            raise InvalidManifest(f"parents must be a list of full cids, got {self.parents!r}")
        if len(set(self.parents)) != len(self.parents):
            raise InvalidManifest("parents must not repeat")
        if self.fork is not None:
            ForkInfo.from_dict(
                self.fork.to_dict() if isinstance(self.fork, ForkInfo) else self.fork
            )
        if not isinstance(self.created, str) or not self.created:
            raise InvalidManifest("created must be an RFC 3339 string")
        if not isinstance(self.fingerprint, dict):
            raise InvalidManifest("fingerprint must be an object")
        try:
            canonical_json(self.fingerprint)
        except (TypeError, ValueError) as exc:
            raise InvalidManifest(f"fingerprint is not plain JSON: {exc}") from None
        if not isinstance(self.sequences, list):
            raise InvalidManifest("sequences must be a list")
        grouped = self.format in GROUPED_FORMATS
        per_head = self.format == FORMAT_HEADS
        for seq in self.sequences:
            if not isinstance(seq, SnapshotSequence):
                raise InvalidManifest("sequences must hold SnapshotSequence objects")
            seq.validate()
            if (seq.heads is not None) != per_head:
                raise InvalidManifest(f"sequences have heads in {FORMAT_HEADS} manifests only, "
                                      "and there always")
            if per_head:
                if seq.groups is not None and any(g.state for g in seq.groups):
                    raise InvalidManifest(f"state groups belong in {FORMAT_STATE} manifests only")
                continue
            if (seq.groups is not None) != grouped:
                raise InvalidManifest(
                    f"a {self.format} manifest's sequences "
                    f"{'must' if grouped else 'must not'} have groups"
                )
            if seq.groups is not None and any(g.state for g in seq.groups) != (
                    self.format == FORMAT_STATE):
                raise InvalidManifest(f"state groups belong in {FORMAT_STATE} manifests only")

    def head_dict(self) -> dict[str, Any]:
        """Every stored field except `sequences`: what a fork child changes (store/fork.py)."""
        return {
            "created": self.created,
            "fingerprint": self.fingerprint,
            "fork": self.fork.to_dict() if self.fork is not None else None,
            "format": self.format,
            "name": self.name,
            "parents": list(self.parents),
        }

    def stored_dict(self) -> dict[str, Any]:
        """The on-disk form: each sequence's pages replaced by its page table's {digest, count}."""
        d = self.head_dict()
        d["sequences"] = []
        for s in self.sequences:
            stored: dict[str, Any] = {
                "pages": {"count": len(s.pages), "digest": page_digest(s.page_table()).hex()},
                "tokens": s.tokens.to_dict(),
            }
            if s.groups is not None:
                stored["groups"] = [g.to_dict() for g in s.groups]
            if s.paged_tokens is not None:
                stored["paged_tokens"] = s.paged_tokens
            if s.heads is not None:
                stored["heads"] = s.heads
            d["sequences"].append(stored)
        return d

    def canonical_bytes(self) -> bytes:
        """The exact bytes stored under the cid in the `snapshots` database."""
        return canonical_json(self.stored_dict())

    @property
    def cid(self) -> str:
        return cid_of(self.canonical_bytes())

    def to_dict(self) -> dict[str, Any]:
        """The logical form, pages inline (what `pf show --json` and the HTTP routes print)."""
        d = self.head_dict()
        d["sequences"] = [s.to_dict() for s in self.sequences]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Parse the logical form; an unknown `format` raises UnsupportedFormat before anything else."""
        head = parse_head(d)
        if not isinstance(d["sequences"], list):
            raise InvalidManifest("sequences must be a list")
        m = cls(**head, sequences=[SnapshotSequence.from_dict(s) for s in d["sequences"]])
        m.validate()
        return m

    @classmethod
    def from_stored(cls, data: bytes | Mapping[str, Any], tables: Mapping[str, bytes]) -> Manifest:
        """Rebuild a manifest from its stored form and the page table blobs it names."""
        d = json.loads(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        head = parse_head(d)
        sequences = []
        for s in stored_sequences(d):
            table_digest, count = s["pages"]["digest"], s["pages"]["count"]
            pages = decode_page_table(tables[table_digest])
            if len(pages) != count:
                raise InvalidManifest(
                    f"page table {table_digest} has {len(pages)} blocks, not {count}"
                )
            groups = _parse_groups(s["groups"]) if "groups" in s else None
            sequences.append(SnapshotSequence(TokenRef.from_dict(s["tokens"]), pages, groups,
                                              s.get("paged_tokens"), s.get("heads")))
        return cls(**head, sequences=sequences)


def parse_head(d: Any) -> dict[str, Any]:
    """The checked top-level fields of a stored manifest dict (fsck reads them without the
    sequences' page tables)."""
    if not isinstance(d, Mapping):
        raise InvalidManifest("a manifest is a JSON object")
    if "format" in d and d["format"] not in FORMATS:
        raise UnsupportedFormat(str(d["format"]))
    expected = {"format", "name", "parents", "fork", "created", "fingerprint", "sequences"}
    if set(d) != expected:
        missing, extra = sorted(expected - set(d)), sorted(set(d) - expected)
        raise InvalidManifest(f"fields differ: missing {missing}, unexpected {extra}")
    if not isinstance(d["parents"], list) or not all(is_cid(p) for p in d["parents"]):
        raise InvalidManifest(f"parents must be a list of full cids, got {d['parents']!r}")
    if not isinstance(d["name"], str) or not isinstance(d["created"], str):
        raise InvalidManifest("name and created must be strings")
    if not isinstance(d["fingerprint"], dict):
        raise InvalidManifest("fingerprint must be an object")
    return {
        "format": d["format"],
        "name": d["name"],
        "parents": list(d["parents"]),
        "fork": None if d["fork"] is None else ForkInfo.from_dict(d["fork"]),
        "created": d["created"],
        "fingerprint": dict(d["fingerprint"]),
    }


def stored_sequences(d: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The validated `sequences` of a stored manifest dict: tokens and page-table references
    (and, in a grouped manifest, which blocks of which KV-cache group the table holds)."""
    seqs = d.get("sequences")
    if not isinstance(seqs, list):
        raise InvalidManifest("sequences must be a list")
    per_head = d.get("format") == FORMAT_HEADS
    grouped = d.get("format") in GROUPED_FORMATS
    keys = {"tokens", "pages", "groups"} if grouped else {"tokens", "pages"}
    if per_head:
        keys = {"tokens", "pages", "heads"}
    optional = {"paged_tokens", "groups"} if per_head else {"paged_tokens"}
    for s in seqs:
        if not isinstance(s, Mapping) or set(s) - optional != keys:
            raise InvalidManifest(f"a stored sequence is {{{', '.join(sorted(keys))}}} "
                                  f"(and {' or '.join(sorted(optional))} where it has them)")
        tokens = TokenRef.from_dict(s["tokens"], "tokens")
        TokenRef.from_dict(s["pages"], "pages")
        heads = _check_heads(s["heads"]) if per_head else 1
        if s["pages"]["count"] % heads:
            raise InvalidManifest(f"a page table of {s['pages']['count']} entries is not whole "
                                  f"blocks of {heads} heads")
        if "paged_tokens" in s:
            _check_paged(s["paged_tokens"], tokens.count)
        if "groups" in s:
            groups = _parse_groups(s["groups"])
            if per_head and any(g.state for g in groups):
                raise InvalidManifest(f"state groups belong in {FORMAT_STATE} manifests only")
            if sum(g.count for g in groups) * heads != s["pages"]["count"]:
                raise InvalidManifest("a sequence's groups do not add up to its page table")
    return seqs  # type: ignore[return-value]
