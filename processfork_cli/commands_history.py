"""History commands: `pf log` (optionally as a graph) and `pf reflog`."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Any

import typer
from processfork.store import documents
from rich.text import Text

from processfork_cli.options import (
    ApiKeyOpt,
    JsonOpt,
    QuietOpt,
    ServerOpt,
    StoreOpt,
    ViaServerOpt,
)
from processfork_cli.output import Output
from processfork_cli.render import decoration, human_count, human_time, short_cid
from processfork_cli.settings import settings

__all__ = ["register"]

LOG_EXAMPLES = """
Examples:

  pf log                      # history of HEAD, newest first
  pf log --graph --all        # every ref, forks and branches drawn like `git log --graph`
  pf log base/3 -n 5 --json   # the 5 newest ancestors of a ref, for scripts
"""


def log(
    ctx: typer.Context,
    rev: Annotated[
        str | None,
        typer.Argument(
            metavar="REV", help="Start here (with --all: every ref).", show_default="HEAD"
        ),
    ] = None,
    graph: Annotated[bool, typer.Option("--graph", help="Draw the history DAG.")] = False,
    limit: Annotated[
        int | None,
        typer.Option("-n", "--max-count", min=1, metavar="N", help="Show at most N snapshots."),
    ] = None,
    all_refs: Annotated[bool, typer.Option("--all", help="Start from every ref and HEAD.")] = False,
    via_server: ViaServerOpt = False,
    store: StoreOpt = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Show snapshots newest first, walking every parent."""
    s = settings(ctx, store=store, server=server, api_key=api_key, json=json_, quiet=quiet)
    if via_server:
        with s.client() as client:
            doc = client.log(rev, limit=limit, all_refs=all_refs)
    else:
        with s.open_store() as st:
            start = rev if rev is not None or all_refs else "HEAD"
            if start == "HEAD" and st.head().cid is None:
                doc = {"head": documents.head_doc(st), "entries": []}
                s.out.info("HEAD does not point at a snapshot yet; `pf log --all` shows every ref")
            else:
                entries = st.log(start, limit=limit, all_refs=all_refs)
                doc = documents.log_doc(entries, head=documents.head_doc(st))
    if graph:
        doc["graph"] = [
            {"graph": prefix, "cid": entry["cid"] if entry else None}
            for prefix, entry in graph_rows(doc["entries"])
        ]
    s.out.emit(doc, human=lambda out: _render_log(out, doc), quiet=[e["cid"] for e in doc["entries"]])


@dataclass(frozen=True)
class _Node:
    """What the store's `graph_lines` reads of a log entry, rebuilt from a log document so that the
    local and the `--via-server` paths draw the same graph."""

    cid: str
    manifest: SimpleNamespace


def graph_rows(entries: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any] | None]]:
    from processfork.store import graph_lines

    by_cid = {e["cid"]: e for e in entries}
    nodes = [_Node(e["cid"], SimpleNamespace(parents=list(e["parents"]))) for e in entries]
    return [(prefix, by_cid[n.cid] if n else None) for prefix, n in graph_lines(nodes)]


def _entry_text(entry: dict[str, Any], head_ref: str | None) -> Text:
    text = Text(short_cid(entry["cid"]), style="yellow")
    deco = decoration(entry.get("refs", []), head=bool(entry.get("head")), head_ref=head_ref)
    if deco:
        text.append(" ")
        text.append_text(deco)
    text.append(f" {entry.get('name', '')}", style="bold")
    fork = entry.get("fork")
    if fork:
        text.append(f" (fork {fork['index']} of 0..{fork['of'] - 1})", style="magenta")
    text.append(f"  {human_count(entry.get('num_tokens'))} tokens", style="dim")
    if entry.get("num_sequences", 1) != 1:
        text.append(f" in {entry['num_sequences']} sequences", style="dim")
    text.append(f"  {human_time(entry.get('created'))}", style="dim")
    return text


def _render_log(out: Output, doc: dict[str, Any]) -> None:
    head_ref = (doc.get("head") or {}).get("ref")
    by_cid = {e["cid"]: e for e in doc["entries"]}
    if "graph" in doc:
        for row in doc["graph"]:
            line = Text(row["graph"], style="red")
            if row["cid"] is not None:
                line.append(" ")
                line.append_text(_entry_text(by_cid[row["cid"]], head_ref))
            out.render(line)
        return
    for entry in doc["entries"]:
        out.render(_entry_text(entry, head_ref))


def reflog(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="REF", help="Ref name.", show_default="HEAD")] = "HEAD",
    limit: Annotated[
        int | None,
        typer.Option("-n", "--max-count", min=1, metavar="N", help="Show at most N entries."),
    ] = None,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Show where a ref pointed over time, newest first (entries gc keeps until --expire)."""
    s = settings(ctx, store=store, json=json_, quiet=quiet)
    with s.open_store() as st:
        entries = sorted(st.reflog(ref), key=lambda e: e.seq, reverse=True)
    if limit is not None:
        entries = entries[:limit]
    doc = {"ref": ref, "entries": [documents.reflog_entry_doc(e) for e in entries]}

    def human(out: Output) -> None:
        for i, e in enumerate(doc["entries"]):
            line = Text(short_cid(e["new"]) if e["new"] else "(deleted)   ", style="yellow")
            line.append(f" {ref}@{{{i}}}: ")
            line.append(e["action"], style="bold")
            if e["message"]:
                line.append(f": {e['message']}")
            line.append(f"  {human_time(e['time'])}", style="dim")
            out.render(line)

    s.out.emit(doc, human=human, quiet=[e["new"] or "" for e in doc["entries"]])


def register(app: typer.Typer) -> None:
    app.command("log", epilog=LOG_EXAMPLES)(log)
    app.command("reflog")(reflog)
