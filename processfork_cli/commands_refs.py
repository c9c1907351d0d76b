"""Ref commands: `pf refs` / `pf branch` (list, create, delete) and `pf ref set|delete` for scripts.

Deleting a ref is how a branch is abandoned: after its reflog entries expire, `pf gc` reclaims the
snapshots and pages only it reached.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from processfork.store import documents
from rich.text import Text

from processfork_cli.errors import UserError
from processfork_cli.options import (
    ApiKeyOpt,
    JsonOpt,
    QuietOpt,
    ServerOpt,
    StoreOpt,
    ViaServerOpt,
)
from processfork_cli.output import Output
from processfork_cli.render import human_count, short_cid
from processfork_cli.settings import Settings, settings

__all__ = ["register"]

ANY = object()

BRANCH_EXAMPLES = """
Examples:

  pf branch                   # list refs (same as `pf refs`)
  pf branch keep base/3       # new ref `keep` at base/3's snapshot
  pf branch -d base/7         # delete a ref, so gc can reclaim what only it kept
"""

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Ref name, e.g. `main` or `base/3`.")]


def _list_refs(s: Settings, via_server: bool) -> None:
    if via_server:
        with s.client() as client:
            doc = client.refs()
    else:
        with s.open_store() as st:
            doc = documents.refs_doc(st)
    s.out.emit(doc, human=lambda out: _render_refs(out, doc), quiet=[r["name"] for r in doc["refs"]])


def _render_refs(out: Output, doc: dict[str, Any]) -> None:
    head = doc.get("head") or {}
    rows: list[tuple[Any, ...]] = []
    if head.get("cid") and not head.get("ref"):
        rows.append(
            (Text("*", style="bold cyan"), Text("(HEAD detached)", style="bold cyan"),
             Text(short_cid(head["cid"]), style="yellow"), "", "")
        )
    for ref in doc["refs"]:
        current = ref.get("head")
        snapshot = ref.get("snapshot")
        rows.append(
            (
                Text("*" if current else " ", style="bold cyan"),
                Text(ref["name"], style="bold green" if current else "green"),
                Text(short_cid(ref["cid"]), style="yellow"),
                Text("(missing snapshot)", style="red") if ref.get("missing") else (snapshot or ""),
                human_count(ref.get("num_tokens")),
            )
        )
    if not rows:
        out.info("no refs yet")
        return
    out.table(
        ["", "ref", "cid", "name", ("tokens", {"justify": "right"})],
        rows,
    )


def refs(
    ctx: typer.Context,
    via_server: ViaServerOpt = False,
    store: StoreOpt = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """List refs with the snapshot each names; `*` marks the ref HEAD points to."""
    s = settings(ctx, store=store, server=server, api_key=api_key, json=json_, quiet=quiet)
    _list_refs(s, via_server)


def branch(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="Ref to create.")] = None,
    rev: Annotated[
        str | None, typer.Argument(metavar="REV", help="Where it points.", show_default="HEAD")
    ] = None,
    delete: Annotated[
        str | None, typer.Option("-d", "--delete", metavar="NAME", help="Delete this ref.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option("-f", "--force", help="Move an existing ref; delete the ref HEAD points to."),
    ] = False,
    via_server: ViaServerOpt = False,
    store: StoreOpt = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """List refs (no arguments), create one (NAME [REV]) or delete one (-d NAME), like `git branch`."""
    s = settings(ctx, store=store, server=server, api_key=api_key, json=json_, quiet=quiet)
    if delete is not None:
        if name is not None or rev is not None:
            raise UserError("give either -d NAME or NAME [REV], not both")
        _delete(s, delete, force=force, old=None)
    elif name is not None:
        if via_server:
            raise UserError("--via-server only lists refs; create refs on the store's machine")
        _set(s, name, rev or "HEAD", expected_old=ANY if force else None, action="branch")
    else:
        if force:
            raise UserError("--force needs NAME [REV] or -d NAME")
        _list_refs(s, via_server)


def _set(s: Settings, name: str, rev: str, *, expected_old: Any, action: str) -> None:
    from processfork.store import ANY as STORE_ANY

    with s.open_store(readonly=False) as st:
        cid = st.resolve(rev)
        old = st.get_ref(name)
        if expected_old is None and old is not None:
            raise UserError(
                f"ref {name!r} already exists at {short_cid(old)}",
                hint="move it with -f or `pf ref set NAME REV`",
            )
        expected = STORE_ANY if expected_old is ANY else expected_old
        st.set_ref(name, cid, expected_old=expected, message=f"{action}: {rev}", action=action)
    doc = {"ref": name, "cid": cid, "old": old}
    s.out.emit(
        doc,
        human=lambda out: out.info(
            f"{name} -> {short_cid(cid)}" + (f" (was {short_cid(old)})" if old and old != cid else "")
        ),
        quiet=[cid],
    )


def _delete(s: Settings, name: str, *, force: bool, old: str | None) -> None:
    from processfork.store import ANY as STORE_ANY
    from processfork.store import RefIsHead, UnknownRevision

    with s.open_store(readonly=False) as st:
        expected = STORE_ANY if old is None else st.resolve(old)
        try:
            current = st.delete_ref(name, expected_old=expected, allow_head=force)
        except UnknownRevision:
            raise UserError(f"no ref named {name!r}", hint="`pf refs` lists refs") from None
        except RefIsHead as exc:
            raise UserError(
                str(exc), hint="use -f to delete it anyway; HEAD then points nowhere"
            ) from None
    doc = {"ref": name, "deleted": current}
    s.out.emit(doc, human=lambda out: out.info(f"deleted {name} (was {short_cid(current)})"),
               quiet=[current])


ref_app = typer.Typer(
    name="ref",
    help="Set or delete one ref, with an optional compare-and-swap guard (for scripts).",
    invoke_without_command=True,
)


@ref_app.callback()
def _ref_group(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


@ref_app.command("set")
def ref_set(
    ctx: typer.Context,
    name: NameArg,
    rev: Annotated[str, typer.Argument(metavar="REV", help="Snapshot the ref will name.")],
    old: Annotated[
        str | None,
        typer.Option("--old", metavar="REV", help="Only if the ref now names this snapshot."),
    ] = None,
    create: Annotated[bool, typer.Option("--create", help="Only if the ref does not exist yet.")] = False,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Point NAME at REV (created if missing); --old / --create make it a compare-and-swap."""
    s = settings(ctx, store=store, json=json_, quiet=quiet)
    if old is not None and create:
        raise UserError("give --old or --create, not both")
    if create:
        expected: Any = None
    elif old is not None:
        with s.open_store() as st:
            expected = st.resolve(old)
    else:
        expected = ANY
    _set(s, name, rev, expected_old=expected, action="set")


@ref_app.command("delete")
def ref_delete(
    ctx: typer.Context,
    name: NameArg,
    old: Annotated[
        str | None,
        typer.Option("--old", metavar="REV", help="Only if the ref now names this snapshot."),
    ] = None,
    force: Annotated[bool, typer.Option("-f", "--force", help="Even if HEAD points to it.")] = False,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Delete the ref NAME (its reflog stays until it expires)."""
    s = settings(ctx, store=store, json=json_, quiet=quiet)
    _delete(s, name, force=force, old=old)


RESET_EXAMPLES = """
Examples:

  pf reset sessions/agent-42 'sessions/agent-42~3'   # roll a session back three turns
  pf reset main base/2 --old main~1                  # only if main has not moved since
"""


def reset(
    ctx: typer.Context,
    name: NameArg,
    rev: Annotated[str, typer.Argument(metavar="REV", help="Snapshot the ref moves to.")],
    old: Annotated[
        str | None,
        typer.Option("--old", metavar="REV", help="Only if the ref now names this snapshot."),
    ] = None,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Move the existing ref NAME to REV (a session continues from there on its next turn)."""
    s = settings(ctx, store=store, json=json_, quiet=quiet)
    with s.open_store() as st:
        current = st.get_ref(name)
        if current is None:
            raise UserError(f"no ref named {name!r}", hint="`pf refs` lists refs")
        # Resolved before the move: `NAME~3` names where the ref is now, not where it will be.
        expected = st.resolve(old) if old is not None else current
        target = st.resolve(rev)
    _set(s, name, target, expected_old=expected, action="reset")


def register(app: typer.Typer) -> None:
    app.command("refs")(refs)
    app.command("branch", epilog=BRANCH_EXAMPLES)(branch)
    app.add_typer(ref_app)
    app.command("reset", epilog=RESET_EXAMPLES)(reset)
