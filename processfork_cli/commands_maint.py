"""Store maintenance: `pf status`, `pf fsck`, `pf gc`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from processfork_cli.errors import IntegrityProblems, UserError
from processfork_cli.options import JsonOpt, QuietOpt, StoreOpt
from processfork_cli.output import Output, to_jsonable
from processfork_cli.render import human_bytes, human_count, short_cid
from processfork_cli.settings import settings

__all__ = ["register"]

GC_EXAMPLES = """
Examples:

  pf gc --dry-run             # what would go, nothing deleted
  pf gc                       # unreachable objects older than 10 minutes
  pf branch -d trial/3 && pf gc --prune now --expire now   # drop an abandoned branch right away
  pf gc --remote origin --dry-run   # packs of the remote no remote ref reaches, a day old
"""


def _key_value_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """Generic rendering of flat records: sizes as bytes, counts with separators."""
    rows = []
    for key, value in doc.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={short_cid(v) if k == 'cid' else v}" for k, v in value.items())
        elif key.endswith(("bytes", "size")):
            value = human_bytes(value)
        elif key == "seconds" and isinstance(value, (int, float)):
            value = f"{value:.3f} s"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = human_count(value)
        rows.append((key.replace("_", " "), str(value)))
    return rows


def status(
    ctx: typer.Context,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Store location, size and object counts."""
    s = settings(ctx, store=store, json=json_, quiet=quiet)
    with s.open_store() as st:
        doc = to_jsonable(st.status())

    def human(out: Output) -> None:
        out.fields(_key_value_rows(doc))
        if doc.get("abandoned_pins"):
            out.info(
                f"{human_count(doc['abandoned_pins'])} pin(s) of exited writers hold "
                f"{human_bytes(doc['abandoned_pin_bytes'])}: `pf gc` drops them"
            )

    s.out.emit(doc, human=human, quiet=[str(doc.get("path", ""))])


def fsck(
    ctx: typer.Context,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Verify every page digest, manifest, reference and ref; exit 3 if anything is wrong."""
    s = settings(ctx, store=store, json=json_, quiet=quiet)
    out = s.out
    with s.open_store() as st, out.progress("fsck") as progress:
        issues = [to_jsonable(issue) for issue in st.fsck(progress=progress)]

    def human(out: Output) -> None:
        for issue in issues:
            _print_issue(out, issue)
        if not issues:
            out.info("fsck: no problems found")
        elif any(issue["snapshots"] for issue in issues):
            out.hint(
                "a checkout of an affected snapshot recomputes the damaged blocks; "
                "`pf repair` recomputes them on a running server and stores them again"
            )

    # -q: the damaged objects, then every snapshot and ref that uses one, each once.
    quiet = [str(i["object"]) for i in issues]
    quiet += [x for i in issues for x in (*i["snapshots"], *i["refs"])]
    out.emit(
        {"ok": not issues, "issues": issues},
        human=human,
        quiet=list(dict.fromkeys(quiet)),
    )
    if issues:
        raise IntegrityProblems(len(issues))


#: How many refs a human fsck line names before it counts the rest.
_REFS_SHOWN = 3


def _print_issue(out: Output, issue: dict[str, Any]) -> None:
    line = Text.assemble(
        (f"{issue.get('kind', 'problem')}", "red bold"),
        " ",
        (str(issue.get("object", "")), "yellow"),
        f": {issue.get('message', '')}",
    )
    cids, refs = issue["snapshots"], issue["refs"]
    if cids:
        line.append(f"; used by {human_count(len(cids))} snapshot{'s' if len(cids) != 1 else ''}")
        if refs:
            shown = ", ".join(refs[:_REFS_SHOWN])
            more = f" and {human_count(len(refs) - _REFS_SHOWN)} more" if len(refs) > _REFS_SHOWN else ""
            line.append(f" (ref{'s' if len(refs) != 1 else ''} {shown}{more})")
        elif len(cids) == 1:
            line.append(f" ({short_cid(cids[0])}, no ref)")
        else:
            line.append(" (no ref)")
    out.render(line)


def gc(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be removed; remove nothing.")
    ] = False,
    prune: Annotated[
        str | None,
        typer.Option(
            "--prune",
            metavar="AGE",
            help="Grace period: keep unreachable objects younger than AGE (`now` keeps none). "
            "Default 10m; with --remote, 1d.",
            show_default=False,
        ),
    ] = None,
    expire: Annotated[
        str,
        typer.Option(
            "--expire",
            metavar="AGE",
            help="Drop reflog entries older than AGE (`never` keeps all); what only they kept goes too.",
        ),
    ] = "30d",
    session_ttl: Annotated[
        str | None,
        typer.Option(
            "--session-ttl",
            metavar="AGE",
            help="First delete session refs (sessions/...) that have not moved for AGE.",
        ),
    ] = None,
    session_prefix: Annotated[
        list[str] | None,
        typer.Option(
            "--session-prefix",
            metavar="PREFIX",
            help="Session refs are those under PREFIX (repeatable); default: the prefixes the "
            "servers recorded in the store.",
        ),
    ] = None,
    remote: Annotated[
        str | None,
        typer.Option(
            "--remote",
            metavar="REMOTE",
            help="Collect a remote instead: delete its packs that no remote ref reaches.",
        ),
    ] = None,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Delete snapshots, pages and blobs that no ref, reflog entry or writer in progress reaches."""
    from processfork.store import parse_age

    s = settings(ctx, store=store, json=json_, quiet=quiet)
    if remote is not None:
        _gc_remote(s, remote, dry_run=dry_run, prune=prune or "1d")
        return
    prune = prune or "10m"
    grace, expiry = parse_age(prune), parse_age(expire)
    ttl = None if session_ttl is None else parse_age(session_ttl)
    if session_prefix is not None and not all(session_prefix):
        raise UserError("--session-prefix must not be empty: every ref would be a session ref")
    with s.open_store(readonly=dry_run) as st, s.out.progress("gc") as progress:
        stats = st.gc(dry_run=dry_run, prune=grace, expire=expiry, progress=progress,
                      session_ttl=ttl, session_prefixes=session_prefix or None)
    doc: dict[str, Any] = {"dry_run": dry_run, "prune": prune, "expire": expire}
    doc.update(to_jsonable(stats))
    doc.update(dry_run=dry_run, prune=prune, expire=expire)

    def human(out: Output) -> None:
        title = "gc --dry-run: would remove" if dry_run else "gc: removed"
        rows = [
            (k, v)
            for k, v in _key_value_rows(doc)
            if k not in ("dry run", "prune", "expire")
        ]
        out.fields(rows, title=title)

    s.out.emit(doc, human=human)


def _gc_remote(s: Any, remote: str, *, dry_run: bool, prune: str) -> None:
    from processfork.store import parse_age
    from processfork.store.remote.porcelain import gc_remote_named

    grace = parse_age(prune)
    with s.open_store() as st:
        stats = gc_remote_named(st, remote, grace=grace, dry_run=dry_run)
    doc: dict[str, Any] = {"remote": remote, "prune": prune}
    doc.update(to_jsonable(stats))

    def human(out: Output) -> None:
        title = f"gc --remote {remote} --dry-run: would remove" if dry_run else f"gc --remote {remote}: removed"
        out.fields([(k, v) for k, v in _key_value_rows(doc) if k not in ("dry run", "prune", "remote")],
                   title=title)

    s.out.emit(doc, human=human)


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("fsck")(fsck)
    app.command("gc", epilog=GC_EXAMPLES)(gc)
