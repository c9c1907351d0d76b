"""Commands that act on the live engine through the server: `pf snapshot`, `pf checkout`,
`pf repair`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from processfork_cli.errors import RepairIncomplete, ServerError, UserError
from processfork_cli.options import ApiKeyOpt, JsonOpt, QuietOpt, RevArg, ServerOpt, StoreOpt
from processfork_cli.output import Output
from processfork_cli.render import human_bytes, human_count, short_cid
from processfork_cli.settings import settings

__all__ = ["register"]

SNAPSHOT_EXAMPLES = """
Examples:

  pf snapshot base --prompt-file ctx.txt       # the KV of that context
  pf snapshot chat --messages-file msgs.json   # an OpenAI messages list, chat template applied
  pf snapshot answer --request-id cmpl-1a2b3c  # a finished request: its prompt and its output
  pf snapshot everything                       # every sequence the engine holds now
"""

CHECKOUT_EXAMPLES = """
Examples:

  pf checkout base          # by ref name
  pf checkout 3f2a9c1e      # by unique cid prefix (7+ hex digits)
"""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not JSON ({what}): {exc.msg} at line {exc.lineno}") from exc


def _token_ids(path: Path) -> list[int]:
    """A JSON list of ints, or whitespace/comma separated ints."""
    text = _read_text(path).strip()
    try:
        value = json.loads(text) if text.startswith("[") else [int(t) for t in text.replace(",", " ").split()]
    except (json.JSONDecodeError, ValueError) as exc:
        raise UserError(f"{path} must hold token ids (a JSON list or whitespace-separated ints)") from exc
    if not value or not all(isinstance(t, int) and t >= 0 for t in value):
        raise UserError(f"{path} must hold a non-empty list of non-negative token ids")
    return value


def snapshot(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Ref name for the new snapshot (e.g. base, agent/turn-3).")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="Text to snapshot.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option("--prompt-file", help="File whose text to snapshot.")
    ] = None,
    messages_file: Annotated[
        Path | None,
        typer.Option("--messages-file", help="JSON file with an OpenAI `messages` list."),
    ] = None,
    token_ids_file: Annotated[
        Path | None, typer.Option("--token-ids-file", help="File with token ids (JSON list).")
    ] = None,
    request_id: Annotated[
        str | None,
        typer.Option("--request-id", help="Id of a finished OpenAI response: its prompt + output."),
    ] = None,
    parent: Annotated[
        str | None,
        typer.Option("--parent", help="Parent snapshot (default: the snapshot NAME points to)."),
    ] = None,
    message: Annotated[str | None, typer.Option("-m", "--message", help="Reflog message.")] = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Freeze KV into the store. With no source option: every sequence the engine holds now."""
    s = settings(ctx, server=server, api_key=api_key, json=json_, quiet=quiet)
    sources = [
        o for o in (prompt, prompt_file, messages_file, token_ids_file, request_id) if o is not None
    ]
    if len(sources) > 1:
        raise UserError(
            "give at most one of --prompt, --prompt-file, --messages-file, --token-ids-file, "
            "--request-id"
        )
    body: dict[str, Any] = {"parent": parent, "message": message}
    if prompt is not None:
        body["prompt"] = prompt
    elif prompt_file is not None:
        body["prompt"] = _read_text(prompt_file)
    elif messages_file is not None:
        body["messages"] = _read_json(messages_file, "an OpenAI messages list")
    elif token_ids_file is not None:
        body["token_ids"] = _token_ids(token_ids_file)
    elif request_id is not None:
        body["request_id"] = request_id
    with s.client() as client:
        doc = client.snapshot(name, **body)
    s.out.emit(doc, human=lambda out: _render_snapshot(out, doc), quiet=[doc["cid"]])


def _render_snapshot(out: Output, doc: dict[str, Any]) -> None:
    out.line(doc["cid"])
    out.info(
        f"{doc['name']}: {human_count(doc['num_tokens'])} tokens in {doc['num_sequences']} "
        f"sequence(s), {human_count(doc['num_pages'])} blocks ({human_count(doc['new_pages'])} new, "
        f"{human_bytes(doc['bytes_written'])} written) in {doc['ms']:.0f} ms"
    )


def checkout(
    ctx: typer.Context,
    rev: RevArg,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Make a snapshot resident in the engine again; the next request with its tokens skips prefill."""
    s = settings(ctx, server=server, api_key=api_key, json=json_, quiet=quiet)
    with s.client() as client:
        doc = client.checkout(rev)
    s.out.emit(doc, human=lambda out: _render_checkout(out, doc), quiet=[doc["cid"]])


def _render_checkout(out: Output, doc: dict[str, Any]) -> None:
    out.line(doc["cid"])
    out.info(
        f"{doc.get('name', '')}: {human_count(doc['num_tokens'])} tokens resident "
        f"({human_count(doc['tokens_loaded'])} loaded from the store, "
        f"{human_count(doc['tokens_already_resident'])} already cached) in {doc['ms']:.0f} ms"
    )


REPAIR_EXAMPLES = """
Examples:

  pf repair               # every snapshot that uses a damaged or missing page (found like fsck)
  pf repair base agent/3  # these snapshots only
  pf repair --dry-run     # which snapshots would be repaired; needs no server
"""


def repair(
    ctx: typer.Context,
    revs: Annotated[
        list[str] | None,
        typer.Argument(metavar="[REV]...", help="Snapshots to repair (default: every damaged one).",
                       show_default=False),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the damaged snapshots; change nothing.")
    ] = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    store: StoreOpt = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = None,
) -> None:
    """Recompute damaged or missing pages on the server and store them again.

    Pages recomputed with the same bits are back in place for every snapshot that shares them;
    otherwise a repaired copy takes the damaged snapshot's refs. Token ids and page tables cannot
    be recomputed: such snapshots are reported and the command exits 3.
    """
    s = settings(ctx, server=server, api_key=api_key, store=store, json=json_, quiet=quiet)
    with s.open_store() as st, s.out.progress("fsck") as progress:
        targets = [st.resolve(rev) for rev in revs] if revs else _damaged_snapshots(st, progress)
    results: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    if not dry_run:
        with s.client() as client:
            for cid in targets:
                try:
                    results.append(client.repair(cid))
                except ServerError as exc:
                    if exc.error_type != "unrepairable":
                        raise
                    failed.append({"cid": cid, "error": exc.server_message})
    doc = {"dry_run": dry_run, "damaged": targets, "repaired": results, "unrepairable": failed}
    s.out.emit(
        doc,
        human=lambda out: _render_repair(out, doc),
        quiet=[r.get("new_cid") or r["cid"] for r in results] if not dry_run else targets,
    )
    if failed:
        raise RepairIncomplete(len(failed))


def _damaged_snapshots(st: Any, progress: Any) -> list[str]:
    """Every snapshot that uses a damaged or missing page or blob, each once, in fsck's order."""
    from processfork.store.fsck import DAMAGE_KINDS

    cids = [c for i in st.fsck(progress=progress) if i.kind in DAMAGE_KINDS for c in i.snapshots]
    return list(dict.fromkeys(cids))


def _render_repair(out: Output, doc: dict[str, Any]) -> None:
    if not doc["damaged"]:
        out.info("repair: no damaged snapshot")
        return
    if doc["dry_run"]:
        for cid in doc["damaged"]:
            out.line(cid)
        out.info(f"{len(doc['damaged'])} damaged snapshot(s); run without --dry-run to repair")
        return
    for r in doc["repaired"]:
        cid = short_cid(r["cid"])
        if r["result"] == "restored":
            out.line(f"{cid} restored: {human_count(r['damaged_pages'])} page(s) recomputed with "
                     "the same bits, back in place for every snapshot that shares them")
        elif r["result"] == "replaced":
            moved = ", ".join(r["moved_refs"]) or "no ref"
            out.line(f"{cid} replaced by {short_cid(r['new_cid'])}: recomputed pages differ in "
                     f"their bits; moved {moved}")
        else:
            out.line(f"{cid} intact (repaired with a snapshot that shares its pages)")
    for f in doc["unrepairable"]:
        out.line(f"{short_cid(f['cid'])} unrepairable: {f['error']}")


def register(app: typer.Typer) -> None:
    app.command("snapshot", epilog=SNAPSHOT_EXAMPLES)(snapshot)
    app.command("checkout", epilog=CHECKOUT_EXAMPLES)(checkout)
    app.command("repair", epilog=REPAIR_EXAMPLES)(repair)
