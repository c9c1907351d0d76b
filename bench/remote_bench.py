"""Remote benchmark: push and pull through a real S3 endpoint (SeaweedFS on this machine), each
against the same boto3 client putting and getting the same bytes as plain objects, with the same
parallelism, side by side in one run.

    .venv/bin/python bench/remote_bench.py [--quick] [--repeat N] [--dir DIR]

Rows:
- push of a 16K-token snapshot of the bench model (1,024 pages of 384 KiB: 384 MiB) to an empty
  remote, against put_object of the same bytes in objects of the pack size (64 MiB), 8 at a time;
- pull (a fetch into an empty store: range reads, verification, LMDB writes, refs) against
  get_object of those objects, 8 at a time, and against writing the same pages into an empty
  store (`put_pages`, durable commits of 64 MiB, a pull's biggest), which any pull must also do;
- a push after `fork -n 12`: bytes uploaded per child and requests.
Timings are medians of --repeat runs (fresh remote and fresh store each); ours and the baseline
alternate, and each step starts once the disk has written back what the steps before left dirty.
The machine's other load shows in both sides of each ratio alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # processfork_dev

from processfork.store import Manifest, SnapshotSequence, Store
from processfork.store.remote import open_remote
from processfork.store.remote.fetch import fetch, update_refs
from processfork.store.remote.push import PACK_SIZE, push
from rich.console import Console
from rich.table import Table

from processfork_dev.s3_server import BUCKET, start_s3_server

MiB = 1 << 20
PAGE = 32 * 12 * 4 * 64 * 4  # block 32 x 12 layers x 4 KV heads x head_dim 64 x fp32 = 384 KiB
PARALLEL = 8
COMMIT = 64 * MiB  # bytes per durable commit of the store-write row: a pull's biggest


def make_store(path: Path, tokens: int) -> tuple[Store, str]:
    store = Store(path)
    blocks = -(-tokens // 32)
    pages = []
    for _ in range(blocks):
        pages.append(os.urandom(PAGE))
        pages.append(os.urandom(PAGE))
    digests = []
    for i in range(0, len(pages), 64):  # 24 MiB per transaction
        digests += [d.hex() for d in store.put_pages(pages[i : i + 64]).digests]
    seq = SnapshotSequence(store.put_tokens(list(range(tokens))),
                           [(digests[i], digests[i + 1]) for i in range(0, len(digests), 2)])
    m = Manifest(name="ctx", parents=[], fingerprint={"block_size": 32, "model": "bench"},
                 sequences=[seq])
    return store, store.write_snapshot(m, ref="ctx")


def settled() -> float:
    """The clock, once the disk has written back what earlier steps left dirty (SeaweedFS's
    copies of what was just uploaded, the stores just made): a step that syncs its own writes,
    as a pull does, would otherwise wait for those too."""
    os.sync()
    return time.perf_counter()


def plain_objects(nbytes: int) -> list[bytes]:
    data = os.urandom(nbytes)
    return [data[i : i + PACK_SIZE] for i in range(0, nbytes, PACK_SIZE)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a 2K-token snapshot (48 MiB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    opts = ap.parse_args()
    tokens = 2048 if opts.quick else 16384
    work = Path(tempfile.mkdtemp(prefix="pf-remote-bench-", dir=opts.dir))
    server = start_s3_server(work / "s3")
    os.environ.update(server.env())
    console = Console(stderr=True)
    try:
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3", config=Config(max_pool_connections=PARALLEL + 4))
        src, cid = make_store(work / "a", tokens)
        nbytes = 2 * (-(-tokens // 32)) * PAGE
        objects = plain_objects(nbytes)
        push_s, put_s, pull_s, get_s, write_s = [], [], [], [], []
        push_requests = pull_requests = 0
        for run in range(opts.repeat):
            url = f"s3://{BUCKET}/r{run}-{uuid.uuid4().hex[:8]}"
            remote = open_remote(url)  # its client is made before the clock, as the baseline's
            t = settled()
            result = push(src.env, remote, {"ctx": cid})
            push_s.append(time.perf_counter() - t)
            push_requests = result.requests
            assert result.pages == 2 * (-(-tokens // 32)), result

            keys = [f"plain{run}/{i}" for i in range(len(objects))]
            t = settled()
            with ThreadPoolExecutor(PARALLEL) as pool:
                list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]),
                              zip(keys, objects)))
            put_s.append(time.perf_counter() - t)

            target = work / f"b{run}"
            with Store(target) as dst:
                remote = open_remote(url, env=dst.env)  # its client is made before the clock
                t = settled()
                fetched = fetch(dst.env, remote, remote_name="origin")
                update_refs(dst.env, fetched.refs, message="bench")
                pull_s.append(time.perf_counter() - t)
                pull_requests = fetched.requests
                assert fetched.bytes >= nbytes and dst.list_refs()["ctx"] == cid
            shutil.rmtree(target)

            t = settled()
            with ThreadPoolExecutor(PARALLEL) as pool:
                got = list(pool.map(
                    lambda k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read(), keys))
            get_s.append(time.perf_counter() - t)
            assert sum(map(len, got)) == nbytes

            # What any pull must also do: write the pages into a store, durably.
            pages = [bytes(p) for p in src.env.read(lambda txn: [
                txn.get(k, db=src.env.dbs["pages"]) for k in
                src.get_snapshot(cid).page_keys()])]
            with Store(work / f"w{run}") as local:
                t = settled()
                for i in range(0, len(pages), COMMIT // PAGE):
                    local.put_pages(pages[i : i + COMMIT // PAGE])
                write_s.append(time.perf_counter() - t)
            del pages
            shutil.rmtree(work / f"w{run}")

        children = src.fork("ctx", 12)
        url = f"s3://{BUCKET}/fork-{uuid.uuid4().hex[:8]}"
        push(src.env, open_remote(url), {"ctx": cid})
        forked = push(src.env, open_remote(url),
                      {f"ctx/{i}": c for i, c in enumerate(children)})

        def rate(seconds: list[float]) -> float:
            return nbytes / MiB / statistics.median(seconds)

        table = Table(title=f"remote: {nbytes / MiB:.0f} MiB snapshot ({tokens} tokens), "
                            f"{PARALLEL} requests in flight, median of {opts.repeat}")
        for col in ("measure", "ours", "baseline (plain objects)", "ratio", "target"):
            table.add_column(col)
        push_ratio = rate(push_s) / rate(put_s)
        pull_ratio = rate(pull_s) / rate(get_s)
        table.add_row("push", f"{rate(push_s):.0f} MiB/s ({push_requests} requests)",
                      f"{rate(put_s):.0f} MiB/s ({len(objects)} PUTs)", f"{push_ratio:.2f}", ">= 0.80")
        table.add_row("pull", f"{rate(pull_s):.0f} MiB/s ({pull_requests} requests)",
                      f"{rate(get_s):.0f} MiB/s ({len(objects)} GETs)", f"{pull_ratio:.2f}", ">= 0.80")
        table.add_row("pull", f"{rate(pull_s):.0f} MiB/s",
                      f"{rate(write_s):.0f} MiB/s (put_pages into a store, 64 MiB per commit)",
                      f"{rate(pull_s) / rate(write_s):.2f}", "-")
        table.add_row("push after fork -n 12", f"{forked.bytes / 12:.0f} B per child, "
                      f"{forked.requests} requests", "-", "-", "<= 4 KiB per child")
        Console().print(table)
        console.print(f"push runs (s): {[round(x, 2) for x in push_s]}; put: "
                      f"{[round(x, 2) for x in put_s]}; pull: {[round(x, 2) for x in pull_s]}; "
                      f"get: {[round(x, 2) for x in get_s]}; store write: "
                      f"{[round(x, 2) for x in write_s]}")
        return 0
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
