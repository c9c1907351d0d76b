"""Shared pieces of the CLI tests: run `pf` in-process, and build real stores with fake page bytes.

`pf` runs through `processfork_cli.main.run` inside Typer's CliRunner isolation, so the tests see the
same exception handling and exit codes as the console script, with stdout and stderr kept apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processfork.store import Manifest, SnapshotSequence, Store
from typer.testing import CliRunner

from processfork_cli.main import run

BLOCK = 4  # tokens per block of the fake engine
PAGE = 64  # bytes per fake page
FINGERPRINT = {"model": "tiny-llama", "block_size": BLOCK, "kv_dtype": "float32", "num_layers": 2}


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def pf(store: Path | None, *args: str, env: dict[str, str | None] | None = None) -> CliResult:
    """Run `pf ARGS` against `store` (via PF_STORE) and capture exit code, stdout and stderr."""
    base: dict[str, str | None] = {
        "PF_STORE": str(store) if store is not None else None,
        "PF_SERVER": None,
        "PF_API_KEY": None,
        "PF_DEBUG": None,
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }
    base.update(env or {})
    with CliRunner().isolation(env=base) as (stdout, stderr, _mixed):
        code = run(list(args))
        out, err = stdout.getvalue(), stderr.getvalue()
    return CliResult(code, out.decode(), err.decode())


def page_bytes(kind: str, tokens: list[int], end: int) -> bytes:
    """A fake K or V page whose content depends on the token prefix, like real KV does."""
    seed = hashlib.sha256(kind.encode() + b"|" + ",".join(map(str, tokens[:end])).encode()).digest()
    return (seed * (PAGE // len(seed) + 1))[:PAGE]


def snapshot(
    st: Store,
    name: str,
    tokens: list[int],
    *,
    parents: list[str] | tuple[str, ...] = (),
    ref: str | None = None,
    move_head: bool = True,
) -> str:
    """Write one single-sequence snapshot through the store API and return its cid."""
    pairs = []
    for start in range(0, len(tokens), BLOCK):
        end = min(start + BLOCK, len(tokens))
        result = st.put_pages([page_bytes("K", tokens, end), page_bytes("V", tokens, end)])
        k, v = result.digests
        pairs.append((k.hex(), v.hex()))
    manifest = Manifest(
        name=name,
        parents=list(parents),
        fingerprint=dict(FINGERPRINT),
        sequences=[SnapshotSequence(st.put_tokens(tokens), pairs)],
    )
    return st.write_snapshot(manifest, ref=ref if ref is not None else name, move_head=move_head)


@dataclass
class History:
    """base -> child; base forked into base/0..2; HEAD on `main` at child."""

    path: Path
    base: str
    child: str
    forks: list[str]


BASE_TOKENS = list(range(1, 11))  # 10 tokens: blocks [1-4] [5-8] [9-10]
CHILD_TOKENS = BASE_TOKENS + [11, 12, 13, 14, 15]


def build_history(path: Path) -> History:
    with Store(path) as st:
        base = snapshot(st, "base", BASE_TOKENS, move_head=False)
        child = snapshot(st, "child", CHILD_TOKENS, parents=[base], ref="main")
        forks = st.fork("base", 3)
    return History(path, base, child, list(forks))


def bare(cid: str) -> str:
    return cid.removeprefix("sha256:")
