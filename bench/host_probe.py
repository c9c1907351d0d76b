"""Host-side ceilings of the GPU page path: memcpy, xxh3 and pread, on 1 thread and on N.

    python3 bench/host_probe.py [--threads 12] [--gib 2]

Prints GB/s for each; the staged page path cannot move pages faster than these.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

PAGE = 1 << 20


def rate(nbytes: int, fn, threads: int, pool: ThreadPoolExecutor) -> float:
    n = nbytes // PAGE
    bounds = [n * i // threads for i in range(threads + 1)]
    fn(0, min(n, 4))  # warm
    t = time.perf_counter()
    list(pool.map(lambda lohi: fn(*lohi), itertools.pairwise(bounds)))
    return nbytes / (time.perf_counter() - t) / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=12)
    p.add_argument("--gib", type=float, default=2.0)
    opts = p.parse_args()
    nbytes = int(opts.gib * (1 << 30)) // PAGE * PAGE
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst[:] = 0
    rows_s, rows_d = src.reshape(-1, PAGE), dst.reshape(-1, PAGE)
    with tempfile.NamedTemporaryFile(dir=os.environ.get("PROBE_DIR", "/tmp")) as f:
        f.write(src.tobytes())
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)

        def copy(lo, hi):
            for i in range(lo, hi):
                np.copyto(rows_d[i], rows_s[i])

        def hash_(lo, hi):
            for i in range(lo, hi):
                xxhash.xxh3_128_digest(rows_s[i])

        def pread(lo, hi):
            for i in range(lo, hi):
                os.preadv(fd, [rows_d[i]], i * PAGE)

        def pread_hash(lo, hi):
            for i in range(lo, hi):
                os.preadv(fd, [rows_d[i]], i * PAGE)
                xxhash.xxh3_128_digest(rows_d[i])

        for threads in (1, opts.threads):
            with ThreadPoolExecutor(threads) as pool:
                out = {name: rate(nbytes, fn, threads, pool) for name, fn in
                       (("memcpy", copy), ("xxh3", hash_), ("pread", pread),
                        ("pread+xxh3", pread_hash))}
            print(f"threads={threads:2d} " + "  ".join(f"{k} {v:6.1f} GB/s" for k, v in out.items()),
                  flush=True)
        os.close(fd)
    path = os.path.join(os.environ.get("PROBE_DIR", "/tmp"), "probe-write.bin")
    t = time.perf_counter()
    with open(path, "wb") as out:
        out.write(memoryview(src))
        os.fsync(out.fileno())
    write = nbytes / (time.perf_counter() - t) / 1e9
    os.unlink(path)
    print(f"write+fsync {write:.2f} GB/s  xxhash {xxhash.VERSION}  cpus {os.cpu_count()}")


if __name__ == "__main__":
    main()
