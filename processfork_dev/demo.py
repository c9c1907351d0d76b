"""`make demo` (`python -m processfork_dev.demo`): the whole product on this machine, in minutes.

Builds a small model, serves it with `pf serve`, snapshots a long agent context, forks it three
ways, continues each branch with the OpenAI client, snapshots the branches, restarts the server,
checks one branch out and shows that its continuation is bit-identical and its prefill skipped,
then draws the history and garbage-collects a dropped branch. The steps live in
`processfork_dev.demo_flow`; this module only presents them. Whatever happens (an error, Ctrl-C,
SIGTERM), the server is stopped before the process exits.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from processfork_cli.render import human_bytes, human_count, short_cid
from processfork_dev.demo_flow import (
    BRANCHES,
    CONTINUATION_TOKENS,
    PRESETS,
    RECOMPUTE_TRIALS,
    SERVER_ARGS,
    Branch,
    DemoFlow,
    GcResult,
    RestoreResult,
)

__all__ = ["app", "run_demo"]

T = TypeVar("T")
RESTORED, DROPPED = 1, 2  # the branch checked out after the restart, the branch gc reclaims
STEPS = 10


class DemoCheckFailed(Exception):
    """The product did not keep a promise the demo checks (fidelity, skipped prefill)."""


class _Terminated(BaseException):
    """SIGTERM/SIGHUP, raised in the main thread so `finally` blocks stop the server."""


def _on_signal(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


class Presenter:
    """Numbered steps, the `pf` command each one stands for, spinners for the slow ones."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.n = 0

    def step(self, title: str, command: str | None = None) -> None:
        self.n += 1
        self.console.print()
        self.console.print(Text.assemble((f"[{self.n}/{STEPS}] ", "bold cyan"), (title, "bold")))
        if command:
            self.console.print(Text(f"  $ {command}", style="green"))

    def say(self, *parts: str | tuple[str, str]) -> None:
        self.console.print(Text.assemble("  ", *parts))

    def note(self, text: str) -> None:
        self.console.print(Text(f"  {text}", style="dim"))

    @contextmanager
    def spinner(self, text: str) -> Iterator[None]:
        with self.console.status(text):
            yield

    def track(self, items: Sequence[T], description: str) -> Iterator[T]:
        """A progress bar on a terminal; plain iteration in logs and pipes."""
        if not self.console.is_terminal:
            yield from items
            return
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=len(items))
            for item in items:
                yield item
                bar.advance(task)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _start(flow: DemoFlow, p: Presenter, what: str) -> None:
    flow.start_server()
    with p.spinner(f"{what}: starting vLLM with the processfork plugin (about a minute)..."):
        seconds = flow.wait_ready()
    p.say(("ready", "green"),
          f" in {seconds:.0f} s on {flow.base_url}  (log: {_relative(flow.log_path)})")


def _present(flow: DemoFlow, p: Presenter, t_start: float) -> dict[str, Any]:
    rel = _relative
    p.step("Use the given model" if flow.given_model else
           "Build a small local model (random weights, fp32)", _build_command(flow))
    with p.spinner("building the model..."):
        flow.prepare()
        model = flow.build_model()
    p.say(f"{rel(model)}: {_describe_model(model)}")

    p.step("Start the server", f"pf serve {rel(model)} {' '.join(SERVER_ARGS)} "
           f"--store {rel(flow.store_path)}")
    _start(flow, p, "first start")
    engine = flow.engine_status()["engine"]
    page_bytes = int(engine["page_bytes"])
    block = int(engine["block_size"])

    p.step("Snapshot a long agent context",
           f"pf snapshot base --prompt-file {rel(flow.context_path)}")
    with p.spinner("prefilling the context and storing its KV pages..."):
        base = flow.snapshot_base()
    p.say(("base ", "bold"), short_cid(base["cid"]), f"  {human_count(base['num_tokens'])} tokens, "
          f"{base['num_pages']} blocks, {human_bytes(base['bytes_written'])} written in "
          f"{_ms(base['ms'] / 1000)}")

    p.step(f"Fork it {len(BRANCHES)} ways", f"pf fork base -n {len(BRANCHES)}")
    fork_cids = flow.fork()
    for i, cid in enumerate(fork_cids):
        p.say((f"base/{i}", "green"), f"  {short_cid(cid)}  shares all {base['num_pages']} blocks "
              "of base")
    p.note("a fork writes metadata only: no page is copied")

    p.step("Continue each branch with the OpenAI client (different temperature and seed)",
           "client.completions.create(model=..., prompt=context, temperature=T, seed=S)")
    branches = [flow.continue_branch(i, cid)
                for i, cid in p.track(list(enumerate(fork_cids)), "sampling continuations")]
    for b in branches:
        p.say((b.ref, "green"), f"  T={b.temperature} seed={b.seed}: "
              f"{CONTINUATION_TOKENS} tokens  {json.dumps(b.text[:48], ensure_ascii=False)}")
    p.note("the weights are random, so the text is noise; what matters is that branches differ")

    p.step("Snapshot the branches (prompt + what each one generated)",
           "pf snapshot base/N --request-id <the response id>")
    for b in p.track(branches, "snapshotting branches"):
        flow.snapshot_branch(b)
    for b in branches:
        s = b.snapshot
        shared = s["num_pages"] - s["new_pages"]
        p.say((b.ref, "green"), f"  {short_cid(s['cid'])}  parent {short_cid(s['parents'][0])}  "
              f"{human_count(s['num_tokens'])} tokens: {shared} blocks shared, {s['new_pages']} new "
              f"({human_bytes(s['bytes_written'])})")
    restored = branches[RESTORED]
    with p.spinner(f"reference: greedy continuation of {restored.ref} before the restart..."):
        before = flow.greedy(restored.tokens)
    p.say(f"reference continuation of {restored.ref}: {len(before.token_ids)} greedy tokens with "
          "logprobs, recorded before the restart")

    p.step(f"Restart the server and check {restored.ref} out", f"pf checkout {restored.ref}")
    flow.stop_server()
    p.say("server stopped: the engine's KV cache is gone")
    _start(flow, p, "restart")
    with p.spinner("measuring a cold prefill, then the checkout..."):
        result = flow.restore(restored, before)
    _present_restore(p, result, block)

    p.step("History", "pf log --graph --all")
    if flow.cli("log", "--graph", "--all") != 0:
        raise RuntimeError("pf log --graph failed")

    dropped = branches[DROPPED]
    p.step(f"Drop branch {dropped.ref} and collect garbage",
           f"pf branch -d {dropped.ref} && pf gc --prune now --expire now")
    gc = flow.drop_branch_and_gc(dropped)
    p.note("--prune now: no grace period for fresh objects; --expire now: forget reflog entries,")
    p.note("which would otherwise keep the dropped branch reachable for 30 days (as in git)")
    p.say(f"reclaimed {gc.removed('num_pages')} pages ({human_bytes(gc.removed('page_bytes'))}) and "
          f"{gc.removed('num_snapshots')} snapshots ({dropped.ref} and its fork child); the "
          f"{dropped.snapshot['num_pages'] - dropped.snapshot['new_pages']} blocks it shared with "
          "base stay")

    summary = _summary(flow, base, fork_cids, branches, result, gc, page_bytes, t_start)
    p.step("Summary")
    _present_summary(p, summary)
    return summary


def _present_restore(p: Presenter, r: RestoreResult, block: int) -> None:
    p.say(f"recompute: cold prefill of {human_count(r.prompt_tokens)} unseen tokens (same length) "
          f"took {_ms(r.recompute_best)} (best of {RECOMPUTE_TRIALS}; cached_tokens "
          f"{max(r.recompute_cached)})")
    c = r.checkout
    p.say(f"checkout {r.ref}: {human_count(c['tokens_loaded'])} tokens loaded from the store "
          f"({c['pages_loaded']} blocks) in {_ms(r.checkout_seconds)}")
    split = (r.prompt_tokens - 1) // block * block
    skipped = r.first_token_cached == split and c["tokens_loaded"] == split
    p.say(("prefill skipped: " if skipped else "prefill NOT skipped: ", "bold green" if skipped
           else "bold red"),
          f"vLLM reports cached_tokens {human_count(r.first_token_cached)} of "
          f"{human_count(r.prompt_tokens)} prompt tokens (the last partial block is computed)")
    p.say(f"restore (checkout + first token) {_ms(r.restore_seconds)} vs recompute "
          f"{_ms(r.recompute_best)}: ", (f"{r.speedup:.1f}x faster", "bold"))
    if r.identical:
        p.say(("continuation after restore: identical", "bold green"),
              f" ({len(r.after.token_ids)} tokens, logprobs bit-for-bit)")
    else:
        p.say(("continuation after restore: DIFFERENT", "bold red"),
              f" before {r.before.token_ids} after {r.after.token_ids}")
    if not skipped:
        raise DemoCheckFailed("the restored branch was not served from the prefix cache")
    if not r.identical:
        raise DemoCheckFailed("the continuation after the restore differs from the one before")


def _summary(flow: DemoFlow, base: dict[str, Any], forks: list[str], branches: list[Branch],
             r: RestoreResult, gc: GcResult, page_bytes: int, t_start: float) -> dict[str, Any]:
    pair = 2 * page_bytes  # one block = a K page and a V page
    blocks = base["num_pages"] * (1 + len(forks)) + sum(b.snapshot["num_pages"] for b in branches)
    return {
        "model": str(flow.model_path),
        "base": {k: base[k] for k in ("cid", "num_tokens", "num_pages", "bytes_written", "ms")},
        "forks": forks,
        "branches": [
            {"ref": b.ref, "temperature": b.temperature, "seed": b.seed,
             **{k: b.snapshot[k] for k in ("cid", "parents", "num_tokens", "num_pages",
                                           "new_pages", "bytes_written")}}
            for b in branches
        ],
        "sharing": {"snapshots": 1 + len(forks) + len(branches), "blocks_referenced": blocks,
                    "bytes_referenced": blocks * pair,
                    "bytes_stored": int(gc.before["page_bytes"])},
        "restore": {
            "ref": r.ref, "prompt_tokens": r.prompt_tokens,
            "tokens_loaded": r.checkout["tokens_loaded"],
            "first_token_cached_tokens": r.first_token_cached,
            "identical": r.identical, "compared_tokens": len(r.after.token_ids),
            "checkout_seconds": r.checkout_seconds, "first_token_seconds": r.first_token_seconds,
            "restore_seconds": r.restore_seconds, "recompute_seconds": r.recompute_seconds,
            "speedup": r.speedup,
        },
        "gc": {"ref": gc.ref, "cid": gc.cid,
               **{f"removed_{k}": gc.removed(k) for k in ("num_pages", "page_bytes",
                                                          "num_snapshots", "num_blobs")}},
        "seconds": time.monotonic() - t_start,
    }


def _present_summary(p: Presenter, s: dict[str, Any]) -> None:
    share, r, gc = s["sharing"], s["restore"], s["gc"]
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    new = sum(b["new_pages"] for b in s["branches"])
    table.add_row("saved", f"base: {human_count(s['base']['num_tokens'])} tokens in "
                  f"{s['base']['num_pages']} blocks ({human_bytes(s['base']['bytes_written'])}); "
                  f"{len(s['branches'])} branches: {new} new blocks in all")
    table.add_row("shared", f"{share['snapshots']} snapshots reference "
                  f"{human_bytes(share['bytes_referenced'])} of KV; the store holds "
                  f"{human_bytes(share['bytes_stored'])} "
                  f"({share['bytes_referenced'] / max(1, share['bytes_stored']):.1f}x less)")
    table.add_row("restored", f"{r['ref']} after a restart: {human_count(r['tokens_loaded'])} "
                  f"tokens loaded, continuation identical over {r['compared_tokens']} tokens")
    table.add_row("faster", f"{_ms(r['restore_seconds'])} to restore vs "
                  f"{_ms(min(r['recompute_seconds']))} to recompute: {r['speedup']:.1f}x")
    table.add_row("gc", f"dropping {gc['ref']} freed {human_bytes(gc['removed_page_bytes'])} "
                  f"({gc['removed_num_pages']} pages)")
    p.console.print(table)


def _describe_model(folder: Path) -> str:
    """Architecture and KV bytes per token (fp32, as served here), from the model's config.json."""
    try:
        config = json.loads((folder / "config.json").read_text())
        layers = int(config["num_hidden_layers"])
        kv_heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return "model folder"
    arch = ", ".join(config.get("architectures") or ["model"])
    kv = 2 * layers * kv_heads * head_dim * 4
    return (f"{arch}, {layers} layers, hidden {config.get('hidden_size')}, {kv_heads} KV heads; "
            f"{human_bytes(kv)} of KV per token")


def _build_command(flow: DemoFlow) -> str | None:
    """The model builder's own command line, where one of its presets builds the same model."""
    from processfork_dev.model_builder import PRESETS as BUILDER_PRESETS

    if flow.given_model is not None:
        return None
    for name, spec in BUILDER_PRESETS.items():
        if spec == PRESETS[flow.preset]:
            return (f"python -m processfork_dev.model_builder "
                    f"{_relative(flow.workdir)}/model-{flow.preset} --preset {name}")
    return None


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run_demo(workdir: Path, *, model: Path | None = None, preset: str = "demo",
             port: int | None = None, timeout: float = 600.0,
             console: Console | None = None) -> int:
    """Run the demo; returns the exit code. The server never outlives this call."""
    from processfork.plugin.server_process import ServerStartError

    from processfork_cli.errors import CliError
    from processfork_dev.model_builder import ModelBuildError

    if console is None:
        console = Console(soft_wrap=True, highlight=False)
        if not console.is_terminal:
            console.width = 120  # logs and pipes: keep the summary's rows on one line
    p = Presenter(console)
    t_start = time.monotonic()
    flow = DemoFlow(workdir, model=model, preset=preset, port=port, ready_timeout=timeout)
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    console.print(Text("processfork demo: git for the KV cache of a running vLLM server",
                       style="bold"))
    console.print(Text(f"work folder {_relative(flow.workdir)} (model, store, server log, "
                       "summary.json)", style="dim"))
    code = 0
    try:
        summary = _present(flow, p, t_start)
        flow.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    except KeyboardInterrupt:
        console.print(Text("\ninterrupted: stopping the server", style="yellow"))
        code = 130
    except _Terminated as exc:
        console.print(Text(f"\nsignal {exc.args[0]}: stopping the server", style="yellow"))
        code = 128 + int(exc.args[0])
    except DemoCheckFailed as exc:
        console.print(Text(f"demo: check failed: {exc}", style="bold red"))
        code = 3
    except (ServerStartError, ModelBuildError, CliError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        console.print(Text(f"demo: error: {first} (server log: {flow.log_path})", style="bold red"))
        code = 2
    except Exception as exc:  # openai's errors and the rest: one line, then clean up
        if os.environ.get("PF_DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
            raise
        console.print(Text(f"demo: error: {type(exc).__name__}: {exc} (server log: "
                           f"{flow.log_path})", style="bold red"))
        code = 2
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave the server running.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            flow.close()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if code == 0:
        console.print()
        console.print(Text(f"server stopped; demo finished in {time.monotonic() - t_start:.0f} s "
                           f"(summary: {_relative(flow.summary_path)})", style="bold green"))
    else:
        console.print(Text("server stopped", style="dim"))
    return code


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Folder for the model, store and "
                                          "server log (its store is recreated).")] = Path(".demo"),
    model: Annotated[Path | None, typer.Option("--model", help="Use this model folder instead of "
                                               "building one.")] = None,
    preset: Annotated[str, typer.Option("--preset", help="Model to build: "
                                        + ", ".join(PRESETS) + ".")] = "demo",
    port: Annotated[int | None, typer.Option("--port", help="Server port (default: a free "
                                             "one).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the server "
                                           "to start.")] = 600.0,
) -> None:
    """Snapshot, fork, restore and gc the KV cache of a local vLLM server, end to end."""
    if preset not in PRESETS:
        raise typer.BadParameter(f"choose one of {', '.join(PRESETS)}", param_hint="--preset")
    raise typer.Exit(run_demo(workdir, model=model, preset=preset, port=port, timeout=timeout))


if __name__ == "__main__":
    app(prog_name="python -m processfork_dev.demo")
