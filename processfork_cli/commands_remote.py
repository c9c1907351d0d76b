"""Remotes: `pf remote add/list/remove`, `pf push`, `pf fetch`, `pf pull`, `pf clone`.

A remote is a folder of an S3-compatible bucket (docs/format.md, "Remotes"). The endpoint and
credentials come from the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`) and config files, as for any AWS tool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from processfork_cli.options import JsonOpt, QuietOpt, StoreOpt
from processfork_cli.output import Output, to_jsonable
from processfork_cli.render import human_bytes, human_count, short_cid
from processfork_cli.settings import settings

__all__ = ["register"]

RemoteArg = Annotated[
    str,
    typer.Argument(metavar="REMOTE", help="A remote's name (`pf remote list`) or an s3:// URL."),
]
RefsArg = Annotated[
    list[str] | None,
    typer.Argument(metavar="[REF]...", help="Refs to move (default: see the command's help).",
                   show_default=False),
]
ForceOpt = Annotated[
    bool, typer.Option("-f", "--force", help="Move refs even where that is not a fast-forward.")
]

REMOTE_EXAMPLES = """
Examples:

  export AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=…
  pf remote add origin s3://kv-snapshots/team-a
  pf remote list
  pf remote remove origin
"""
PUSH_EXAMPLES = """
Examples:

  pf push origin base                # upload only what the remote lacks, then move its ref
  pf push origin --all               # every local ref (not the remotes/ tracking refs)
  pf push origin main --force        # even if the remote's main is not an ancestor
"""
PULL_EXAMPLES = """
Examples:

  pf fetch origin                    # objects and remotes/origin/* refs; local refs unchanged
  pf pull origin                     # fetch, then fast-forward the local refs of the same names
  pf clone s3://kv-snapshots/team-a ~/other-store && pf log --store ~/other-store base
"""

remote_app = typer.Typer(
    name="remote",
    help="Add, list or remove the named remotes of the store (S3-compatible object storage).",
    invoke_without_command=True,
    epilog=REMOTE_EXAMPLES,
)


@remote_app.callback()
def _remote_group(
    ctx: typer.Context,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    if ctx.invoked_subcommand is None:
        remote_list(ctx, store=store, json_=json_, quiet=quiet)


@remote_app.command("add")
def remote_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The remote's name, e.g. origin.")],
    url: Annotated[str, typer.Argument(metavar="URL", help="s3://BUCKET or s3://BUCKET/PREFIX.")],
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Name a remote: NAME stands for URL in push, fetch and pull."""
    from processfork.store.remote import add_remote

    s = settings(ctx, store=store, json=json_, quiet=quiet)
    with s.open_store(readonly=False) as st:
        normalized = add_remote(st.env, name, url)
    s.out.emit({"name": name, "url": normalized},
               human=lambda out: out.info(f"added remote {name} -> {normalized}"), quiet=[name])


@remote_app.command("list")
def remote_list(
    ctx: typer.Context,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """List the named remotes and their URLs."""
    from processfork.store.remote import list_remotes

    s = settings(ctx, store=store, json=json_, quiet=quiet)
    with s.open_store() as st:
        remotes = list_remotes(st.env)

    def human(out: Output) -> None:
        if not remotes:
            out.info("no remotes (`pf remote add NAME s3://BUCKET/PREFIX` adds one)")
            return
        out.table(["remote", "url"], [[n, u] for n, u in remotes.items()])

    s.out.emit({"remotes": [{"name": n, "url": u} for n, u in remotes.items()]},
               human=human, quiet=list(remotes))


@remote_app.command("remove")
def remote_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The remote to forget.")],
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Forget a remote (nothing on the remote is deleted; its remotes/NAME/ refs stay)."""
    from processfork.store.remote import remove_remote

    s = settings(ctx, store=store, json=json_, quiet=quiet)
    with s.open_store(readonly=False) as st:
        url = remove_remote(st.env, name)
    s.out.emit({"name": name, "url": url},
               human=lambda out: out.info(f"removed remote {name} ({url})"), quiet=[name])


def _rate(nbytes: int, seconds: float) -> str:
    return f"{human_bytes(nbytes / seconds)}/s" if seconds > 0 and nbytes else "-"


def _ref_line(old: str | None, new: str, src: str, dst: str, status: str) -> str:
    if status == "created":
        return f" * [new ref]      {src} -> {dst}"
    if status == "up-to-date":
        return f" = [up to date]   {src} -> {dst}"
    sep = "..." if status == "forced" else ".."
    mark = "+" if status == "forced" else " "
    line = f" {mark} {short_cid(old)}{sep}{short_cid(new)}  {src} -> {dst}"
    return line + (" (forced)" if status == "forced" else "")


def push(
    ctx: typer.Context,
    remote: RemoteArg,
    refs: RefsArg = None,
    all_refs: Annotated[bool, typer.Option("--all", help="Push every local ref.")] = False,
    force: ForceOpt = False,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Upload the snapshots REFs name (default: HEAD's ref) and move the remote's refs.

    Only objects the remote lacks are sent, in packs; the refs move last, each by a conditional
    write, and only as a fast-forward unless --force.
    """
    from processfork.store.remote.porcelain import push_refs

    s = settings(ctx, store=store, json=json_, quiet=quiet)
    with s.open_store(readonly=False) as st, s.out.progress("push") as progress:
        result = push_refs(st, remote, refs or (), all_refs=all_refs, force=force,
                           progress=progress)
    doc = to_jsonable(result)

    def human(out: Output) -> None:
        out.info(f"To {result.url}")
        for u in result.refs:
            out.info(_ref_line(u.old, u.new, u.ref, u.ref, u.status))
        out.info(
            f"pushed {human_count(result.objects)} objects ({human_count(result.pages)} pages, "
            f"{human_count(result.blobs)} blobs, {human_count(result.snapshots)} snapshots), "
            f"{human_bytes(result.bytes)} in {human_count(result.packs)} pack(s), "
            f"{human_count(result.requests)} requests, {result.seconds:.2f} s "
            f"({_rate(result.bytes, result.seconds)})"
        )

    s.out.emit(doc, human=human, quiet=[u.ref for u in result.refs])


def _fetch_human(out: Output, result: Any, remote: str) -> None:
    out.info(f"From {result.url}")
    out.info(
        f"fetched {human_count(result.snapshots)} snapshots, {human_count(result.pages)} pages, "
        f"{human_count(result.blobs)} blobs ({human_bytes(result.bytes)}), "
        f"{human_count(result.requests)} requests, {result.seconds:.2f} s "
        f"({_rate(result.bytes, result.seconds)})"
    )


def fetch(
    ctx: typer.Context,
    remote: RemoteArg,
    refs: RefsArg = None,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Download what the remote's refs (all, or REFs) reach and the store lacks; record where
    they are in the refs remotes/REMOTE/REF. Local refs do not move."""
    from processfork.store.remote.porcelain import fetch_remote

    s = settings(ctx, store=store, json=json_, quiet=quiet)
    with s.open_store(readonly=False) as st, s.out.progress("fetch") as progress:
        result = fetch_remote(st, remote, refs or (), progress=progress)

    def human(out: Output) -> None:
        _fetch_human(out, result, remote)
        for ref, cid in result.refs.items():
            out.info(f"   {short_cid(cid)}  {ref} -> remotes/{remote}/{ref}")

    s.out.emit(to_jsonable(result), human=human, quiet=list(result.refs.values()))


def pull(
    ctx: typer.Context,
    remote: RemoteArg,
    refs: RefsArg = None,
    force: ForceOpt = False,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Fetch, then fast-forward (or create) each local ref named like a remote ref (all, or
    REFs). A ref that diverged is left alone and the command exits 1."""
    from processfork.store.remote import NonFastForward
    from processfork.store.remote.porcelain import pull as pull_remote

    s = settings(ctx, store=store, json=json_, quiet=quiet)
    with s.open_store(readonly=False) as st, s.out.progress("pull") as progress:
        result = pull_remote(st, remote, refs or (), force=force, progress=progress)
    _emit_pull(s.out, result, remote)
    if result.diverged:
        first = result.diverged[0]
        more = f" (and {len(result.diverged) - 1} more)" if len(result.diverged) > 1 else ""
        raise NonFastForward(
            first.ref,
            f"it diverged from remotes/{remote}/{first.ref}{more}; "
            "`pf log --graph --all` shows both, --force takes the remote's",
        )


def _emit_pull(out: Output, result: Any, remote: str) -> None:
    doc = {"fetch": to_jsonable(result.fetch), "refs": to_jsonable(result.refs)}

    def human(o: Output) -> None:
        _fetch_human(o, result.fetch, remote)
        for m in result.refs:
            if m.status == "diverged":
                o.warn(f"{m.ref}: diverged ({short_cid(m.old)} here, {short_cid(m.new)} there); "
                       "left as it is")
            else:
                o.info(_ref_line(m.old, m.new, m.ref, m.ref, m.status))

    out.emit(doc, human=human, quiet=[m.ref for m in result.refs if m.status != "diverged"])


def clone(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(metavar="URL", help="s3://BUCKET/PREFIX of the remote.")],
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="A new store: a missing or empty folder.")
    ],
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Make a new store in DIR with every snapshot and ref of the remote at URL (as `origin`)."""
    from processfork.store.remote.porcelain import clone as clone_remote

    s = settings(ctx, json=json_, quiet=quiet)
    with s.out.progress("clone") as progress:
        result = clone_remote(url, directory, progress=progress)
    doc = {"path": result.path, "url": result.url, "fetch": to_jsonable(result.pull.fetch),
           "refs": to_jsonable(result.pull.refs)}

    def human(out: Output) -> None:
        out.info(f"cloned {result.url} into {result.path}")
        _fetch_human(out, result.pull.fetch, "origin")
        names = [m.ref for m in result.pull.refs]
        if names:
            out.info(f"refs: {', '.join(names[:8])}{' …' if len(names) > 8 else ''}")

    s.out.emit(doc, human=human, quiet=[result.path])


def register(app: typer.Typer) -> None:
    app.add_typer(remote_app)
    app.command("push", epilog=PUSH_EXAMPLES)(push)
    app.command("fetch", epilog=PULL_EXAMPLES)(fetch)
    app.command("pull", epilog=PULL_EXAMPLES)(pull)
    app.command("clone", epilog=PULL_EXAMPLES)(clone)
