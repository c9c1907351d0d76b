"""What a page's size costs the store: the reason v4 manifests can afford one KV head per page.

    .venv/bin/python bench/page_size_bench.py [--mib 128] [--sizes 16,128,1024]

For each page size (KiB), the same total of random bytes is hashed (XXH3-128, the page digest)
and written with `put_pages` into a fresh store: once into an empty store (every page new: hash,
insert, journal, durable commit) and then again (every page present: hash, look up, re-stamp).
Smaller pages mean more LMDB records and more hashing calls for the same bytes; the rows show
where that per-record cost stops mattering. Best of 3 for the hash and the warm write.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from processfork.store import Store, page_digest


def measure(total: int, size: int) -> dict[str, float]:
    pages = [os.urandom(size) for _ in range(total // size)]
    hash_s = warm_s = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for p in pages:
            page_digest(p)
        hash_s = min(hash_s, time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as d, Store(os.path.join(d, "s")) as store:
        t = time.perf_counter()
        store.put_pages(pages)
        cold_s = time.perf_counter() - t
        for _ in range(3):
            t = time.perf_counter()
            store.put_pages(pages)
            warm_s = min(warm_s, time.perf_counter() - t)
    return {"pages": len(pages), "hash": total / hash_s, "cold": total / cold_s,
            "warm": total / warm_s, "warm_us": warm_s / len(pages) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="bytes written per size, in MiB")
    parser.add_argument("--sizes", default="16,128,1024", help="page sizes in KiB, comma-separated")
    args = parser.parse_args()
    total = args.mib << 20
    print(f"load average at start: {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    print("page KiB  pages  xxh3 GB/s  new pages GB/s  present pages GB/s  us/present page")
    for kib in (int(x) for x in args.sizes.split(",")):
        r = measure(total, kib << 10)
        print(f"{kib:8d} {r['pages']:6d} {r['hash'] / 1e9:10.2f} {r['cold'] / 1e9:15.2f} "
              f"{r['warm'] / 1e9:19.2f} {r['warm_us']:16.1f}")


if __name__ == "__main__":
    main()
