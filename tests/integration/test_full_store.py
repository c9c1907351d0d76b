"""A server whose store runs out of disk, and a store whose pages rot on disk.

Full store: the store lives on a small tmpfs, and snapshots of distinct prompts fill it until the
server answers ``507 store_full``. Nothing acknowledged before is lost, nothing half-written is
left, generation goes on, and once refs are deleted and gc has run, snapshots work again and
restore.

Corruption: bytes of stored pages are changed behind the store's back, by flipping bytes of the
page where it lies in ``data.mdb`` (and through LMDB). A checkout never loads them: it answers
``500 integrity_error``, the engine recomputes the blocks and continues like a warm prefix-cache
hit; ``pf fsck --json`` names each page with every snapshot and ref that uses it, and ``pf
repair`` makes the store clean again.

Both share one server with a small KV cache, so that a few filler prompts evict every block and a
checkout really loads from the store (nothing is restarted). Figures are printed and written to
``reliability-*.json`` under the test's tmp dir (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pf_http import PF, cached_tokens, complete, get, headers, pf, post, random_tokens
from processfork.store import Store, page_digest

from processfork_cli.main import run
from processfork_dev.store_damage import damage_object

pytestmark = pytest.mark.integration

BLOCK = 32
FS_MIB = 8  # a few 600-token snapshots (19 blocks, 38 pages of 32 KiB) fit, then the disk is full
FILL_TOKENS = 600
MAX_FILL = 60  # a store that never fills within this many snapshots is a failure
CYCLES = 20  # fill-and-free cycles of the slow test
MAX_MODEL_LEN = 2048
# 8 MiB of fp32 KV for the tiny model: 4096 tokens, 128 blocks. Filler prompts evict them all.
# Eager: its continuations are compared only with its own (conftest's EAGER).
SERVER_ARGS = ("--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", "512",
               "--kv-cache-memory-bytes", "8M", "--enforce-eager")


def split_point(length: int) -> int:
    """Tokens vLLM's prefix cache serves for a prompt it has seen: whole blocks, never the last."""
    return (length - 1) // BLOCK * BLOCK


def _logprobs(completion: dict[str, Any]) -> dict[str, Any]:
    return completion["choices"][0]["logprobs"]


def same_continuation(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bit-identical: the same tokens, logprobs and top logprobs."""
    la, lb = _logprobs(a), _logprobs(b)
    return all(la[k] == lb[k] for k in ("tokens", "token_logprobs", "top_logprobs"))


def max_delta(a: dict[str, Any], b: dict[str, Any]) -> float:
    pairs = zip(_logprobs(a)["token_logprobs"], _logprobs(b)["token_logprobs"])
    return max(abs(x - y) for x, y in pairs)


def warm(server, tokens: list[int]) -> dict[str, Any]:
    """A greedy continuation served from the engine's own blocks (a warm prefix-cache hit)."""
    out = complete(server, tokens, max_tokens=8, logprobs=5)
    assert cached_tokens(out) == split_point(len(tokens))
    return out


def evict_all(server, seed: int) -> None:
    """Run prompts no snapshot shares until every block the engine held has been reused."""
    engine = get(server, f"{PF}/status").json()["engine"]
    need = (engine["num_blocks"] + 8) * BLOCK
    size = MAX_MODEL_LEN - BLOCK
    for i in range(-(-need // size)):
        complete(server, random_tokens(10_000_000 + seed * 100 + i, size), max_tokens=1)


def pf_cli(server, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(["--server", server.base_url, "--store", str(server.store), *args])
    out, err = capsys.readouterr()
    return code, out, err


def fsck_issues(path: Path) -> list[Any]:
    with Store(path, readonly=True) as store:
        return list(store.fsck())


def write_figures(tmp_path: Path, name: str, figures: dict[str, Any]) -> None:
    path = tmp_path / f"reliability-{name}.json"
    path.write_text(json.dumps(figures, indent=2))
    print(f"\n{name}: {json.dumps(figures)}\n(written to {path})")


@dataclass
class SmallFsServer:
    """The module's server on a store in a FS_MIB tmpfs, or why there is none."""

    mount: Path | None
    live: Any = None
    skip_reason: str = ""

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
        if self.mount is not None:
            if subprocess.run(["umount", str(self.mount)], capture_output=True,
                              check=False).returncode:
                subprocess.run(["umount", "-l", str(self.mount)], check=False)
            self.mount = None


def launch_ahead(servers) -> SmallFsServer:
    """Mount a FS_MIB tmpfs for the store (needs root; the module is skipped where mounting is
    not allowed) and launch the server on it."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        return SmallFsServer(None, skip_reason="mounting a small tmpfs for the store needs root")
    mnt = servers.tmp_path_factory.mktemp("small-fs") / f"fs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_MIB}m", "tmpfs", str(mnt)],
                         capture_output=True, check=False)
    if res.returncode != 0:
        return SmallFsServer(None, skip_reason=f"cannot mount a tmpfs here: "
                                               f"{res.stderr.decode().strip()}")
    small = SmallFsServer(mnt)
    try:
        small.live = servers.launch(store=mnt / "store", extra_args=SERVER_ARGS)
    except BaseException:
        small.stop()
        raise
    return small


@pytest.fixture(scope="module")
def server(servers):
    small = servers.take(__name__) or launch_ahead(servers)
    if small.live is None:
        pytest.skip(small.skip_reason)
    try:
        yield small.live.wait()
    finally:
        small.stop()


# --- full store ----------------------------------------------------------------------------
class Filled:
    """What filling the store left: the acknowledged snapshots and the first 507."""

    def __init__(self) -> None:
        self.acked: list[dict[str, Any]] = []  # {name, cid, tokens, warm}
        self.full: Any = None
        self.figures: dict[str, Any] = {}


def fill(server, seed: int, into: Filled, sizes: tuple[int, ...] = (FILL_TOKENS,)) -> Filled:
    """Snapshot distinct prompts (each checked warm) until the store answers 507."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    for i in range(MAX_FILL):
        tokens = random_tokens(seed + i, rng.choice(sizes))
        name = f"full/{seed}/{i}"
        response = post(server, f"{PF}/snapshot", {"name": name, "token_ids": tokens})
        if response.status_code == 507:
            into.full = response
            break
        assert response.status_code == 200, response.text
        into.acked.append({"name": name, "cid": response.json()["cid"], "tokens": tokens,
                           "warm": warm(server, tokens)})
    assert into.full is not None, f"the {FS_MIB} MiB store never filled"
    into.figures = {"fs_mib": FS_MIB, "acknowledged": len(into.acked),
                    "fill_seconds": round(time.perf_counter() - t0, 1),
                    "free_bytes_when_full": shutil.disk_usage(server.store).free}
    return into


def assert_intact(server, acked: list[dict[str, Any]]) -> None:
    """fsck is clean, and every acknowledged snapshot is there with its tokens and sound pages."""
    assert fsck_issues(server.store) == []
    with Store(server.store, readonly=True) as store:
        for snap in acked:
            assert store.get_ref(snap["name"]) == snap["cid"]
            assert store.find_damage(snap["cid"]).intact
            manifest = store.get_snapshot(snap["cid"])
            assert store.get_tokens(manifest.sequences[0].tokens) == snap["tokens"]
            for k, v in manifest.sequences[0].pages:
                for digest in (k, v):
                    assert page_digest(store.get_page(bytes.fromhex(digest))).hex() == digest
        # A failed snapshot leaves no snapshot, no job record and no pin behind.
        assert len(list(store.iter_snapshots())) == len(acked)
        assert store.meta_items("job:") == {}
        assert store.list_pins() == {}


def delete_all_and_collect(server) -> dict[str, Any]:
    with Store(server.store, readonly=True) as store:
        names = list(store.list_refs())
    for name in names:
        response = httpx_delete(server, name)
        assert response.status_code == 200, response.text
    with Store(server.store) as store:
        stats = store.gc(prune="now", expire="now")
    assert fsck_issues(server.store) == []
    return {"removed_snapshots": stats.removed_snapshots,
            "removed_page_bytes": stats.removed_page_bytes}


@pytest.fixture(scope="module")
def filled(server) -> Filled:
    return fill(server, 8000, Filled())


def test_a_full_disk_is_a_507_with_the_json_error_shape(server, filled):
    assert filled.acked, "not even one snapshot fitted: the filesystem is too small"
    response = filled.full
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == "store_full" and body["error"]["message"]
    print("507:", body)
    # A fork writes only metadata; thousands of children do not fit either, and none is left.
    fork = post(server, f"{PF}/fork", {"cid": filled.acked[0]["name"], "n": 4096})
    assert fork.status_code == 507, fork.text
    assert fork.json()["error"]["type"] == "store_full"
    refs = get(server, f"{PF}/refs").json()["refs"]
    assert [r["name"] for r in refs if r["name"].startswith(filled.acked[0]["name"] + "/")] == []


def test_nothing_half_written_and_every_acknowledged_snapshot_intact(server, filled):
    assert_intact(server, filled.acked)


def test_generation_is_served_while_the_store_is_full(server, filled):
    out = complete(server, random_tokens(8500, 300), max_tokens=8)
    assert out["choices"][0]["text"] is not None
    assert out["usage"]["completion_tokens"] == 8
    # A restore needs no room: it reads pages (and moves HEAD in place).
    evict_all(server, 85)
    snap = filled.acked[0]
    checkout = post(server, f"{PF}/checkout", {"cid": snap["name"]})
    assert checkout.status_code == 200, checkout.text
    assert checkout.json()["cid"] == snap["cid"]
    assert checkout.json()["tokens_loaded"] == split_point(len(snap["tokens"]))
    restored = complete(server, snap["tokens"], max_tokens=8, logprobs=5)
    assert same_continuation(restored, snap["warm"])
    # Still full: the next snapshot is refused the same way.
    again = post(server, f"{PF}/snapshot", {"name": "full/again",
                                            "token_ids": random_tokens(8501, FILL_TOKENS)})
    assert again.status_code == 507, again.text


def test_after_gc_snapshots_work_again_and_everything_restores(server, filled, capsys, tmp_path):
    keep, drop = filled.acked[:1], filled.acked[1:]
    for i, snap in enumerate(drop):
        if i % 2:
            code, _, err = pf_cli(server, "ref", "delete", snap["name"], "-f", capsys=capsys)
            assert code == 0, err
        else:
            response = httpx_delete(server, snap["name"])
            assert response.status_code == 200, response.text
    code, out, err = pf_cli(server, "gc", "--prune", "now", "--expire", "now", "--json",
                            capsys=capsys)
    assert code == 0, err
    gc = json.loads(out)
    assert gc["removed_snapshots"] == len(drop)
    assert fsck_issues(server.store) == []

    tokens = random_tokens(8600, FILL_TOKENS)
    response = post(server, f"{PF}/snapshot", {"name": "full/after", "token_ids": tokens})
    assert response.status_code == 200, response.text
    after = {"name": "full/after", "cid": response.json()["cid"], "tokens": tokens,
             "warm": warm(server, tokens)}

    # Restores load from the store (every block evicted first) and continue bit-identically.
    evict_all(server, 86)
    for snap in [*keep, after]:
        checkout = pf(server, "checkout", {"cid": snap["name"]})
        assert checkout["cid"] == snap["cid"]
        assert checkout["tokens_loaded"] == split_point(len(snap["tokens"]))
        restored = complete(server, snap["tokens"], max_tokens=8, logprobs=5)
        assert same_continuation(restored, snap["warm"])
    write_figures(tmp_path, "full-store", {
        **filled.figures, "deleted_refs": len(drop), "gc_removed_page_bytes":
        gc["removed_page_bytes"], "snapshot_after_gc": 200,
        "restored_bit_identical": 1 + len(keep)})
    delete_all_and_collect(server)  # leave room for the tests below


def httpx_delete(server, name: str) -> httpx.Response:
    """DELETE /refs/NAME, also when HEAD points to it."""
    return httpx.delete(f"{server.base_url}{PF}/refs/{name}", params={"force": "true"},
                        headers=headers(server), timeout=60, trust_env=False)


# --- corruption ----------------------------------------------------------------------------
def flip_in_file(store_path: Path, page: bytes, rng: random.Random) -> int:
    """Flip bytes of a page where it lies in data.mdb, as a bad disk would; return the copies."""
    data_file = store_path / "data.mdb"
    data = data_file.read_bytes()
    offsets = []
    at = data.find(page)
    while at >= 0:
        offsets.append(at)
        at = data.find(page, at + 1)
    fd = os.open(data_file, os.O_RDWR)
    try:
        for at in offsets:
            where = at + rng.randrange(len(page) - 16)
            os.pwrite(fd, bytes(b ^ 0xFF for b in data[where:where + 16]), where)
            os.fsync(fd)
    finally:
        os.close(fd)
    return len(offsets)


def test_damaged_pages_are_never_loaded_and_fsck_and_repair_find_them(server, capsys, tmp_path):
    run_corruption(server, capsys, tmp_path, rounds=1, seed=9000)


@pytest.mark.slow
def test_damaged_pages_are_never_loaded_many_rounds(server, capsys, tmp_path):
    run_corruption(server, capsys, tmp_path, rounds=25, seed=9100)


def run_corruption(server, capsys, tmp_path: Path, *, rounds: int, seed: int) -> None:
    """Rounds of 4 damaged pages (2 flipped in data.mdb, 2 overwritten through LMDB); each round
    deletes its refs and collects them, so the small filesystem never fills."""
    totals: dict[str, Any] = {}
    for r in range(rounds):
        figures = corruption_round(server, capsys, seed=seed + 100 * r)
        for key, value in figures.items():
            if isinstance(value, bool):
                totals[key] = totals.get(key, True) and value
            elif isinstance(value, list):
                totals[key] = sorted({*totals.get(key, []), *value})
            elif key == "max_logprob_delta":
                totals[key] = max(totals.get(key, 0.0), value)
            else:
                totals[key] = totals.get(key, 0) + value
    totals["rounds"] = rounds
    write_figures(tmp_path, f"corruption-{rounds}", totals)
    assert totals["caught_by_checkout"] == totals["damaged_pages"] and totals["loaded"] == 0
    assert totals["named_by_fsck"] == totals["damaged_pages"]
    assert totals["fsck_clean_after_repair"]


def corruption_round(server, capsys, *, seed: int, snapshots: int = 4) -> dict[str, Any]:
    rng = random.Random(seed)
    cases = []
    for i in range(snapshots):
        tokens = random_tokens(seed + i, rng.randrange(200, 500))
        name = f"corrupt/{seed}/{i}"
        snap = pf(server, "snapshot", {"name": name, "token_ids": tokens})
        children = pf(server, "fork", {"cid": name, "n": 2})
        cases.append({"name": name, "cid": snap["cid"], "tokens": tokens,
                      "children": children, "warm": warm(server, tokens),
                      "method": "file" if i % 2 == 0 else "lmdb"})
    with Store(server.store, readonly=True) as store:
        for case in cases:
            pages = store.get_snapshot(case["cid"]).sequences[0].pages
            # A block that a checkout loads (not the last, partial one), K or V.
            block = rng.randrange(split_point(len(case["tokens"])) // BLOCK)
            case["digest"] = pages[block][rng.randrange(2)]
            case["page"] = store.get_page(bytes.fromhex(case["digest"]))
    for case in cases:
        if case["method"] == "file":
            assert flip_in_file(server.store, case["page"], rng) >= 1
        else:
            damage_object(server.store, case["digest"])
    evict_all(server, seed)

    caught = loaded = bit_identical = 0
    deltas = []
    for case in cases:
        response = post(server, f"{PF}/checkout", {"cid": case["name"]})
        error = response.json().get("error", {}) if response.status_code != 200 else {}
        ok_error = (response.status_code == 500 and error.get("type") == "integrity_error"
                    and case["digest"] in error.get("message", ""))
        caught += ok_error
        again = complete(server, case["tokens"], max_tokens=8, logprobs=5)
        same_tokens = _logprobs(again)["tokens"] == _logprobs(case["warm"])["tokens"]
        delta = max_delta(again, case["warm"])
        deltas.append(delta)
        bit_identical += same_continuation(again, case["warm"])
        loaded += not (ok_error and same_tokens and delta <= 1e-4)

    code, out, _ = pf_cli(server, "fsck", "--json", capsys=capsys)
    assert code == 3
    issues = {i["object"]: i for i in json.loads(out)["issues"]}
    named = 0
    for case in cases:
        issue = issues.get(case["digest"])
        if issue is None or issue["kind"] != "corrupt-page":
            continue
        users = {case["cid"], *case["children"]["cids"]}
        named += set(issue["snapshots"]) >= users and {
            case["name"], *case["children"]["names"]} <= set(issue["refs"])

    code, out, err = pf_cli(server, "repair", "--json", capsys=capsys)
    assert code == 0, out + err
    results = [r["result"] for r in json.loads(out)["repaired"]]
    code, out, _ = pf_cli(server, "fsck", capsys=capsys)
    assert code == 0, out

    # Clean up, so that the next round finds room on the small filesystem.
    for case in cases:
        for name in (case["name"], *case["children"]["names"]):
            assert httpx_delete(server, name).status_code == 200
    with Store(server.store) as store:
        store.gc(prune="now", expire="now")
    return {"damaged_pages": len(cases),
            "by_file_byte_flip": sum(c["method"] == "file" for c in cases),
            "by_lmdb_overwrite": sum(c["method"] == "lmdb" for c in cases),
            "caught_by_checkout": caught, "loaded": loaded, "named_by_fsck": named,
            "continuations_bit_identical": bit_identical,
            "max_logprob_delta": max(deltas), "repair_results": sorted(set(results)),
            "fsck_clean_after_repair": code == 0}


@pytest.mark.slow
def test_fill_and_free_cycles(server, tmp_path):
    """Fill to 507 with snapshots of mixed sizes (the disk runs out at other points of a
    snapshot), check, free everything, again: gc gives the room back every time."""
    cycles = []
    for c in range(CYCLES):
        filled = fill(server, 20000 + 100 * c, Filled(), sizes=(40, 200, 600))
        assert filled.full.json()["error"]["type"] == "store_full"
        assert_intact(server, filled.acked)
        assert complete(server, random_tokens(29000 + c, 300), max_tokens=4)["choices"]
        freed = delete_all_and_collect(server)
        assert freed["removed_snapshots"] == len(filled.acked)
        # The room is back: the largest snapshot fits again.
        response = post(server, f"{PF}/snapshot", {"name": "full/room",
                                                   "token_ids": random_tokens(29999, 600)})
        assert response.status_code == 200, response.text
        delete_all_and_collect(server)
        cycles.append({**filled.figures, **freed})
    figures = {"cycles": len(cycles), "acknowledged": sum(c["acknowledged"] for c in cycles),
               "lost": 0, "leftover_jobs_or_pins": 0,
               "acknowledged_per_cycle": [c["acknowledged"] for c in cycles]}
    write_figures(tmp_path, "full-store-cycles", figures)
