"""The steps of `make demo` as a library: build a model, serve it, snapshot, fork, restore, gc.

`processfork_dev.demo` only presents these steps; everything that talks to the server or the store
is here, so the integration test runs exactly what a user sees. Each step returns a plain record.

How the restore is timed, honestly: "restore" is a checkout plus the first token of the branch on
a freshly restarted server. "Recompute" is a cold prefill on that same restarted server of a
prompt it has never seen, of exactly the branch's length. A prefill's cost does not depend on
which tokens it reads, and an unseen prompt cannot hit the prefix cache (vLLM's
`cached_tokens` confirms 0), so the two are measured side by side without one warming the cache
for the other. The server is warmed up with a short unrelated request first.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from processfork.plugin.server_process import ServerProcess, find_free_port, launch_server
from processfork.store import Store

from processfork_cli.client import Client
from processfork_dev.demo_context import AGENT_CONTEXT
from processfork_dev.model_builder import PRESETS as BUILDER_PRESETS
from processfork_dev.model_builder import TinyLlamaSpec, build_model

__all__ = [
    "BRANCHES",
    "PRESETS",
    "Branch",
    "Continuation",
    "DemoFlow",
    "GcResult",
    "RestoreResult",
]

# 6 layers of 512: big enough that recomputing a 2,500-token context takes a visible fraction of
# a second on two cores (so restore vs recompute means something), small enough that the whole
# demo, with two server starts, stays within a few minutes. 12 KiB of KV per token in fp32.
PRESETS: dict[str, TinyLlamaSpec] = {
    "demo": TinyLlamaSpec(num_layers=6, hidden=512, heads=8, kv_heads=4, head_dim=64,
                          intermediate=1408),
    "tiny": BUILDER_PRESETS["tiny"],
}

SERVED_NAME = "demo"
# fp32 so restored continuations can be compared bit for bit (vLLM's CPU backend would downcast
# the checkpoint to bf16); prompt token details so every response reports `cached_tokens`; eager:
# torch.compile gains a model this small little and costs 30-60 s of each of the demo's two
# starts on a CPU (vLLM 0.32 compiles again at every start there). `pf serve` compiles by default,
# and restores are bit-identical either way: a checkout is compared with the same engine's run.
SERVER_ARGS: tuple[str, ...] = (
    "--dtype", "float32",
    "--enforce-eager",
    "--enable-prompt-tokens-details",
    "--max-model-len", "4096",
    "--kv-cache-memory-bytes", "512M",
    "--served-model-name", SERVED_NAME,
)

# (temperature, seed) per branch: the same context continued three different ways.
BRANCHES: tuple[tuple[float, int], ...] = ((0.7, 11), (1.0, 22), (1.3, 33))
CONTINUATION_TOKENS = 48
COMPARE_TOKENS = 16
RECOMPUTE_TRIALS = 2


@dataclass
class Branch:
    """One fork of `base`, continued by the OpenAI client and snapshotted under its ref."""

    index: int
    ref: str
    fork_cid: str
    temperature: float
    seed: int
    response_id: str = ""
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    snapshot: dict[str, Any] = field(default_factory=dict)


@dataclass
class Continuation:
    """A greedy continuation with its logprobs: what must not change across a restore."""

    token_ids: list[int]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    prompt_tokens: int
    cached_tokens: int
    seconds: float

    def same_as(self, other: Continuation) -> bool:
        """Exact equality, floats included: a restore promises bit-identical output."""
        return (
            self.token_ids == other.token_ids
            and self.token_logprobs == other.token_logprobs
            and self.top_logprobs == other.top_logprobs
        )


@dataclass
class RestoreResult:
    """Checkout after a restart, timed against recomputing a prompt of the same length."""

    ref: str
    prompt_tokens: int
    checkout: dict[str, Any]
    checkout_seconds: float
    first_token_seconds: float
    first_token_cached: int
    recompute_seconds: list[float]
    recompute_cached: list[int]
    before: Continuation
    after: Continuation

    @property
    def restore_seconds(self) -> float:
        return self.checkout_seconds + self.first_token_seconds

    @property
    def recompute_best(self) -> float:
        return min(self.recompute_seconds)

    @property
    def speedup(self) -> float:
        return self.recompute_best / self.restore_seconds if self.restore_seconds > 0 else 0.0

    @property
    def identical(self) -> bool:
        return self.after.same_as(self.before)


@dataclass
class GcResult:
    """The store's status (`StoreStatus` as a dict) around dropping one branch and collecting."""

    ref: str
    cid: str
    before: dict[str, Any]
    after: dict[str, Any]

    def removed(self, key: str) -> int:
        return int(self.before[key]) - int(self.after[key])


class DemoFlow:
    """One demo run in `workdir`: its model, store, server log and summary live there.

    The server is started and stopped here; `close()` stops it whatever state the run is in, so
    the caller only has to call it in a `finally`.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        model: str | Path | None = None,
        preset: str = "demo",
        port: int | None = None,
        ready_timeout: float = 600.0,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        self.workdir = Path(workdir).expanduser().resolve()
        self.given_model = Path(model).expanduser().resolve() if model else None
        self.preset = preset
        self.port = port
        self.ready_timeout = ready_timeout
        self.store_path = self.workdir / "store"
        self.log_path = self.workdir / "server.log"
        self.context_path = self.workdir / "context.txt"
        self.summary_path = self.workdir / "summary.json"
        self.model_path: Path | None = None
        self.server: ServerProcess | None = None
        self.starts = 0
        self._openai: Any = None

    # --- set-up --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """A fresh store each run, so every number printed comes from this run alone."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.store_path.exists():
            if any(self.store_path.iterdir()) and not (self.store_path / "data.mdb").exists():
                raise RuntimeError(f"{self.store_path} exists and is not a processfork store")
            shutil.rmtree(self.store_path)
        if self.log_path.exists():
            self.log_path.unlink()
        self.context_path.write_text(AGENT_CONTEXT)

    def build_model(self) -> Path:
        """The given model folder, or a random Llama built (once, then reused) in the workdir."""
        if self.given_model is not None:
            if not (self.given_model / "config.json").is_file():
                raise RuntimeError(f"{self.given_model} is not a model folder (no config.json)")
            self.model_path = self.given_model
        else:
            self.model_path = build_model(self.workdir / f"model-{self.preset}",
                                          PRESETS[self.preset])
        return self.model_path

    def start_server(self) -> ServerProcess:
        """Launch `pf serve` in the background; `wait_ready` next."""
        if self.model_path is None:
            self.build_model()
        assert self.model_path is not None
        if self.port is None:
            self.port = find_free_port()
        self.starts += 1
        self.server = launch_server(
            self.model_path, port=self.port, store=self.store_path, extra_args=SERVER_ARGS,
            log_path=self.log_path,
        )
        return self.server

    def wait_ready(self) -> float:
        assert self.server is not None
        return self.server.wait_ready(self.ready_timeout)

    def restart_server(self) -> ServerProcess:
        """Stop the engine (its KV cache is gone) and start it again on the same port and store."""
        self.stop_server()
        return self.start_server()

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def close(self) -> None:
        self.stop_server()

    @property
    def base_url(self) -> str:
        assert self.server is not None, "the server is not running"
        return self.server.base_url

    def client(self) -> Client:
        return Client(self.base_url)

    @property
    def openai(self) -> Any:
        if self._openai is None:
            import openai

            self._openai = openai.OpenAI(
                base_url=f"{self.base_url}/v1", api_key="demo", max_retries=0, timeout=600.0
            )
        return self._openai

    def engine_status(self) -> dict[str, Any]:
        with self.client() as client:
            return client.status()

    # --- snapshot, fork, branches -----------------------------------------------------------------
    def snapshot_base(self) -> dict[str, Any]:
        """`pf snapshot base --prompt-file context.txt`: computes the context, stores its KV."""
        with self.client() as client:
            return client.snapshot("base", prompt=self.context_path.read_text())

    def fork(self, n: int = len(BRANCHES)) -> list[str]:
        """`pf fork base -n 3`: refs base/0 .. base/2, sharing every page of base."""
        with self.client() as client:
            return list(client.fork("base", n)["cids"])

    def continue_branch(self, index: int, fork_cid: str) -> Branch:
        """Continue the context with the OpenAI client, sampling with this branch's settings."""
        temperature, seed = BRANCHES[index]
        branch = Branch(index=index, ref=f"base/{index}", fork_cid=fork_cid,
                        temperature=temperature, seed=seed)
        response = self.openai.completions.create(
            model=SERVED_NAME, prompt=self.context_path.read_text(),
            max_tokens=CONTINUATION_TOKENS, temperature=temperature, seed=seed,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        choice = response.choices[0]
        extra = choice.model_extra or {}
        branch.response_id = response.id
        branch.tokens = list(extra["prompt_token_ids"]) + list(extra["token_ids"])
        branch.text = choice.text
        return branch

    def snapshot_branch(self, branch: Branch) -> dict[str, Any]:
        """`pf snapshot base/N --request-id <id>`: the branch's prompt and what it generated.

        The ref base/N names the fork child, so the new snapshot's parent is that child: the
        history chains base -> fork child -> branch, and only the branch's own blocks are new.
        """
        with self.client() as client:
            branch.snapshot = client.snapshot(branch.ref, request_id=branch.response_id)
        if branch.snapshot["num_tokens"] != len(branch.tokens):
            raise RuntimeError(
                f"snapshot of {branch.ref} holds {branch.snapshot['num_tokens']} tokens, the "
                f"request had {len(branch.tokens)}"
            )
        return branch.snapshot

    # --- restore --------------------------------------------------------------------------------
    def greedy(self, tokens: Sequence[int], max_tokens: int = COMPARE_TOKENS) -> Continuation:
        """A greedy continuation with the top-5 logprobs of every generated token."""
        t0 = time.perf_counter()
        response = self.openai.completions.create(
            model=SERVED_NAME, prompt=list(tokens), max_tokens=max_tokens, temperature=0.0,
            logprobs=5, extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        seconds = time.perf_counter() - t0
        choice = response.choices[0]
        logprobs = choice.logprobs
        details = response.usage.prompt_tokens_details
        return Continuation(
            token_ids=list((choice.model_extra or {}).get("token_ids") or []),
            token_logprobs=list(logprobs.token_logprobs or []),
            top_logprobs=[dict(d) for d in (logprobs.top_logprobs or [])],
            prompt_tokens=response.usage.prompt_tokens,
            cached_tokens=int(getattr(details, "cached_tokens", 0) or 0),
            seconds=seconds,
        )

    def first_token(self, tokens: Sequence[int]) -> tuple[float, int]:
        """Seconds to the first token of a prompt, and how many prompt tokens came from cache."""
        result = self.greedy(tokens, max_tokens=1)
        return result.seconds, result.cached_tokens

    def restore(self, branch: Branch, before: Continuation) -> RestoreResult:
        """On the restarted server: recompute baseline, then checkout + first token, then compare."""
        length = len(branch.tokens)
        rng = random.Random(2024)
        vocab = max(branch.tokens) + 1
        self.first_token([rng.randrange(300, vocab) for _ in range(16)])  # warm-up, unrelated
        recompute, recompute_cached = [], []
        for _ in range(RECOMPUTE_TRIALS):
            unseen = [rng.randrange(300, vocab) for _ in range(length)]
            seconds, cached = self.first_token(unseen)
            recompute.append(seconds)
            recompute_cached.append(cached)

        t0 = time.perf_counter()
        with self.client() as client:
            checkout = client.checkout(branch.ref)
        checkout_seconds = time.perf_counter() - t0
        first_seconds, first_cached = self.first_token(branch.tokens)
        after = self.greedy(branch.tokens)
        return RestoreResult(
            ref=branch.ref, prompt_tokens=length, checkout=checkout,
            checkout_seconds=checkout_seconds, first_token_seconds=first_seconds,
            first_token_cached=first_cached, recompute_seconds=recompute,
            recompute_cached=recompute_cached, before=before, after=after,
        )

    # --- history and gc -----------------------------------------------------------------------------
    def cli(self, *args: str) -> int:
        """Run `pf ARGS` in this process against the demo's store and server."""
        from processfork_cli.main import run

        server = ["--server", self.base_url] if self.server is not None else []
        return run(["--store", str(self.store_path), *server, *args])

    def store_status(self) -> dict[str, Any]:
        """The store's counts and sizes now (`pf status`)."""
        with Store(self.store_path, readonly=True) as store:
            return asdict(store.status())

    def drop_branch_and_gc(self, branch: Branch) -> GcResult:
        """`pf branch -d base/N`, then `pf gc --prune now --expire now`, measured around it.

        `--expire now` lets the reflog entries that still name the branch go too; without it they
        would keep it reachable for 30 days, as in git.
        """
        before = self.store_status()
        with Store(self.store_path, readonly=True) as store:
            cid = store.resolve(branch.ref)
        if self.cli("branch", "-d", branch.ref) != 0:
            raise RuntimeError(f"pf branch -d {branch.ref} failed")
        if self.cli("gc", "--prune", "now", "--expire", "now") != 0:
            raise RuntimeError("pf gc failed")
        return GcResult(ref=branch.ref, cid=cid, before=before, after=self.store_status())
