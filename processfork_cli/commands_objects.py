"""Snapshot commands on the store: `pf show`, `pf diff`, `pf fork`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from processfork.store import documents
from processfork.store.manifest import FORMAT_HEADS
from rich.text import Text

from processfork_cli.options import (
    ApiKeyOpt,
    JsonOpt,
    QuietOpt,
    RevArg,
    ServerOpt,
    StoreOpt,
    ViaServerOpt,
)
from processfork_cli.output import Output
from processfork_cli.render import decoration, human_bytes, human_count, human_time, short_cid
from processfork_cli.settings import settings

__all__ = ["register"]

FORK_EXAMPLES = """
Examples:

  pf fork base -n 12                  # base/0 … base/11: name and cid, one per line
  pf fork 3f2a9c1 -n 4                # named after the one ref at 3f2a9c1, if exactly one
  pf fork 3f2a9c1 -n 4 --name trial   # trial/0 … trial/3
  pf fork base -n 12 --json           # {"cids": [...], "names": [...]}
"""


def show(
    ctx: typer.Context,
    rev: RevArg,
    via_server: ViaServerOpt = False,
    store: StoreOpt = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Summarize one snapshot: history, fingerprint, sequences, pages and bytes."""
    s = settings(ctx, store=store, server=server, api_key=api_key, json=json_, quiet=quiet)
    if via_server:
        with s.client() as client:
            doc = client.show(rev)
    else:
        with s.open_store() as st:
            cid = st.resolve(rev)
            manifest = st.get_snapshot(cid)
            refs = documents.refs_by_cid(st.list_refs()).get(cid, [])
            doc = documents.snapshot_doc(st, cid, manifest, refs=refs)
    s.out.emit(doc, human=lambda out: _render_show(out, doc), quiet=[doc["cid"]])


def _render_show(out: Output, doc: dict[str, Any]) -> None:
    fork = doc.get("fork")
    deco = decoration(doc.get("refs", []), head=False, head_ref=None)
    rows: list[tuple[str, Text | str]] = [
        ("snapshot", Text.assemble((doc["cid"], "yellow"), " ", deco)),
        ("name", Text(doc["name"], style="bold")),
        ("parents", "\n".join(doc["parents"]) or "(none: a root)"),
        ("fork", f"child {fork['index']} of {fork['of']} (0-based)" if fork else "-"),
        ("created", human_time(doc["created"])),
        ("format", f"{doc['format']} ({_format_note(doc['format'])}; see docs/format.md)"),
        ("tokens", f"{human_count(doc['num_tokens'])} in {doc['num_sequences']} sequence(s)"),
        (
            "pages",
            (f"{human_count(doc['num_pages'])} distinct in {human_count(doc['num_blocks'])} blocks"
            f" (K and V), {human_bytes(doc['bytes'])}"),
        ),
    ]
    out.fields(rows)
    if doc.get("fingerprint"):
        out.line()
        out.fields(
            [(k, _fingerprint_value(k, v)) for k, v in sorted(doc["fingerprint"].items())],
            title="fingerprint",
        )
    if doc.get("sequences"):
        out.line()
        out.table(
            ["sequence", ("tokens", {"justify": "right"}), ("blocks", {"justify": "right"}),
             ("pages", {"justify": "right"}), "token digest"],
            [
                (i, human_count(q["tokens"]), _blocks_cell(q), human_count(q["pages"]),
                 q["token_digest"])
                for i, q in enumerate(doc["sequences"])
            ],
        )


def _blocks_cell(seq: dict[str, Any]) -> str:
    """A sequence's blocks with pages, and the tail tokens that have none (a session turn's
    partial last block, recomputed by whatever continues it)."""
    tail = seq.get("unsaved_tail_tokens") or 0
    blocks = human_count(seq["blocks"])
    return f"{blocks} + {tail} tokens unsaved" if tail else blocks


def _format_note(fmt: str) -> str:
    if fmt == FORMAT_HEADS:
        return "the page layout: one KV head per page, for any TP size"
    return "the page layout"


def _fingerprint_value(key: str, value: Any) -> str:
    if key == "tp_size":
        return f"{value} (tensor-parallel ranks of the engine that computed the pages)"
    if key == "batch_invariant":
        return ("True: computed with batch-invariant kernels" if value else
                "False: restores match a warm hit under the same batch conditions")
    return _scalar(value)


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def diff(
    ctx: typer.Context,
    a: Annotated[str, typer.Argument(metavar="A", help="First revision.")],
    b: Annotated[str, typer.Argument(metavar="B", help="Second revision.")],
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Compare two snapshots: common token prefix, first divergent token, shared and unique pages."""
    s = settings(ctx, store=store, json=json_, quiet=quiet)
    with s.open_store() as st:
        cid_a, cid_b = st.resolve(a), st.resolve(b)
        doc = documents.diff_doc(cid_a, cid_b, st.diff(cid_a, cid_b))
    s.out.emit(doc, human=lambda out: _render_diff(out, doc, a, b))


def _render_diff(out: Output, doc: dict[str, Any], a: str, b: str) -> None:
    index = doc.get("first_divergent_index")
    if index is None:
        divergence = "none: the token sequences are identical"
    else:
        ta, tb = doc.get("token_a"), doc.get("token_b")
        left = f"{ta} in A" if ta is not None else "A ends"
        right = f"{tb} in B" if tb is not None else "B ends"
        divergence = f"at token {human_count(index)}: {left}, {right}"
    rows = [
        ("A", Text.assemble((short_cid(doc["a"]), "yellow"), f" {a}")),
        ("B", Text.assemble((short_cid(doc["b"]), "yellow"), f" {b}")),
        ("common prefix", f"{human_count(doc.get('common_prefix_tokens'))} tokens"),
        ("first divergence", divergence),
        ("shared pages", _pages(doc.get("shared_pages"), doc.get("shared_bytes"))),
        ("only in A", _pages(doc.get("unique_a"), doc.get("unique_a_bytes"))),
        ("only in B", _pages(doc.get("unique_b"), doc.get("unique_b_bytes"))),
    ]
    out.fields(rows)


def _pages(count: Any, size: Any) -> str:
    if isinstance(count, (list, tuple, set)):
        count = len(count)
    return f"{human_count(count)} ({human_bytes(size)})"


def fork(
    ctx: typer.Context,
    rev: RevArg,
    n: Annotated[int, typer.Option("-n", "--count", min=1, metavar="N", help="Number of children.")],
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            metavar="PREFIX",
            help="Children are named and referenced PREFIX/0 … PREFIX/N-1.",
            show_default="the ref given as REV, or the one ref at that snapshot, else the short cid",
        ),
    ] = None,
    via_server: ViaServerOpt = False,
    store: StoreOpt = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Make N children of a snapshot that share all its pages (metadata only); print each child's
    ref name and cid."""
    s = settings(ctx, store=store, server=server, api_key=api_key, json=json_, quiet=quiet)
    if via_server:
        with s.client() as client:
            doc = client.fork(rev, n, name=name)
    else:
        with s.open_store(readonly=False) as st:
            doc = documents.fork_doc(st.fork_named(rev, n, prefix=name))
    cids = doc["cids"]

    def human(out: Output) -> None:
        width = max(len(ref) for ref in doc["names"])
        for ref, cid in zip(doc["names"], cids):
            out.line(f"{ref:<{width}}  {cid}")
        out.info(f"forked {rev} into {len(cids)} children: {doc['names'][0]} … {doc['names'][-1]}"
                 if len(cids) > 1 else f"forked {rev} into {doc['names'][0]}")

    s.out.emit(doc, human=human, quiet=cids)


def register(app: typer.Typer) -> None:
    app.command("show")(show)
    app.command("diff")(diff)
    app.command("fork", epilog=FORK_EXAMPLES)(fork)
