"""The host side of the staged page path, against bare memcpy, xxh3 and pread of the same bytes.

    python bench/page_path_bench.py [--gib 2] [--threads N ...] [--reader map native python]
        [--run-mib M ...] [--repeat 5] [--json FILE]

No vLLM: the KV cache has Llama-3-8B's shape (32 layers, 8 KV heads of 128, block 16, bf16:
1 MiB pages), on the GPU in vLLM's FlashAttention layout (logical ``[B, H, N, 2D]``, physically
``[B, N, H, 2D]``) when there is one, and otherwise in host memory in vLLM's CPU layout. A store of
``--gib`` GiB of distinct random pages is built on local disk (``--work``, default
``.bench/page_path``) with the product's own save, then, in rounds, side by side:

- **load**: ``StagedPagePath.load`` of every page from the store (page cache warm: the store was
  just written and is read once more before the rounds) into other blocks, verified, as a
  checkout or transparent restore runs it, with the store opened afresh (a new map, as in a
  fresh engine); again with the map already in use; and with ``verify`` off;
- **save, warm store**: ``StagedPagePath.save`` of the same blocks into the store that already
  holds every page, with the store's page lookup and commit, as a snapshot of a resident context
  runs it (``new_pages`` must be 0);
- the ceilings of the same bytes with the same thread count: memcpy (``np.copyto`` of 1 MiB
  rows into a ring the size of the staging slots), xxh3-128, ``pread`` of the pages from the
  store's data file (at their offsets) into that ring, ``pread`` + xxh3; on a GPU, one pinned
  host-to-device and device-to-host copy, and ``pread`` + xxh3 into pinned memory.

On a CPU the staged path scatters into (and gathers from) host tensors instead of copying to a
GPU: that is CI's configuration of the path (``page_path: staged``), and it adds a host copy the
GPU path does not make. ``--diagnose`` also times the load with its device copies left out (not
the product: it tells the host half's speed from what the device copies beside it cost).
``--reader map native python`` measures the copy threads taking a slice of pages per call in C
without the GIL (``plugin/native_pages.py``), copying them out of the store's memory map with the
digest computed as they go (``map``, the product's default on x86-64) or reading them with
``pread`` and hashing them after (``native``), and with one Python call per page to read and one
to hash (``python``), side by side, for each thread count (default: ``map native``).
``--run-mib 0 8`` measures the per-page Python load reading one page per ``preadv`` (the default) and up to 8 MiB
of adjacent pages per ``preadv`` side by side, for each thread count. Each
figure is the best of ``--repeat`` rounds (the host work is
CPU-bound and the machine may be shared); the median is printed beside it. Beside each, the
process's CPU time per GiB (all threads, median of the rounds): on a shared machine the wall time
carries whatever else runs, while the CPU seconds a load costs are what a host with more idle
cores turns into speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from processfork.plugin.codec import PageCodec, codec_for
from processfork.plugin.page_file import RUN_BYTES
from processfork.plugin.staged_pages import StagedPagePath, default_copy_threads
from processfork.store import Store, page_digest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import copy_seconds

REPO = Path(__file__).resolve().parents[1]
LAYERS, HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16  # Llama-3-8B: 128 KiB of KV per token in bf16
GiB = 1 << 30
READER_LABELS = {"map": "compiled, copies from the map",
                 "map-cached": "compiled, copies from the map, cached stores",
                 "native": "compiled, pread",
                 "python": "per-page Python calls"}


def kv_layers(num_blocks: int, device: str) -> list[torch.Tensor]:
    """One buffer of random bytes cut into per-layer tensors in the layout vLLM gives that
    device: FlashAttention's on CUDA (logical ``[B, H, N, 2D]``, physically ``[B, N, H, 2D]``),
    the CPU backend's ``[B, H, N, 2D]`` on a CPU."""
    shape = (LAYERS, num_blocks, BLOCK, HEADS, 2 * HEAD_DIM)
    if device == "cpu":
        shape = (LAYERS, num_blocks, HEADS, BLOCK, 2 * HEAD_DIM)
    nbytes = int(np.prod(shape)) * 2
    raw = torch.empty(nbytes, dtype=torch.uint8, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for lo in range(0, nbytes, GiB // 4):  # in pieces: randint of it all at once needs 8x the memory
        hi = min(nbytes, lo + GiB // 4)
        raw[lo:hi] = torch.randint(0, 256, (hi - lo,), dtype=torch.uint8, device=device,
                                   generator=gen)
    phys = raw.view(torch.bfloat16).view(shape)
    if device == "cpu":
        return list(phys)
    return [phys[i].transpose(1, 2) for i in range(LAYERS)]


def best_and_median(times: list[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)


class Ceilings:
    """memcpy / xxh3 / pread of the same pages, in a pool of the staged path's thread count."""

    def __init__(self, rows: np.ndarray, ring_rows: int, data_file: str, offsets: list[int],
                 threads: int):
        self.rows = rows  # [pages, page_bytes]: the bytes the store holds, in host memory
        self.ring = np.empty((ring_rows, rows.shape[1]), dtype=np.uint8)
        self.ring[:] = 0  # touched once: the staging slots are allocated at start
        self.pinned = None  # the same ring in pinned memory, as the staging slots are on a GPU
        if torch.cuda.is_available():
            self.pinned = torch.zeros(self.ring.shape, dtype=torch.uint8).pin_memory().numpy()
        self.fd = os.open(data_file, os.O_RDONLY)
        self.offsets = offsets
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads)

    def close(self) -> None:
        self.pool.shutdown()
        os.close(self.fd)

    def _run(self, fn: Callable[[int], None]) -> float:
        n = len(self.rows)
        bounds = [n * i // self.threads for i in range(self.threads + 1)]

        def part(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                fn(i)

        t = time.perf_counter()
        list(self.pool.map(lambda b: part(*b), itertools.pairwise(bounds)))
        return time.perf_counter() - t

    def memcpy(self) -> float:
        ring, rows, k = self.ring, self.rows, len(self.ring)
        return self._run(lambda i: np.copyto(ring[i % k], rows[i]))

    def xxh3(self) -> float:
        rows = self.rows
        return self._run(lambda i: xxhash.xxh3_128_digest(rows[i]))

    def pread(self, *, verify: bool = False, pinned: bool = False) -> float:
        ring = self.pinned if pinned and self.pinned is not None else self.ring
        k, fd, offsets = len(ring), self.fd, self.offsets

        def one(i: int) -> None:
            os.preadv(fd, [ring[i % k]], offsets[i])
            if verify:
                xxhash.xxh3_128_digest(ring[i % k])

        return self._run(one)


def page_offsets(store: Store, digests: list[bytes], data_file: str) -> list[int]:
    """Where each page lies in the data file, from where this process maps that file."""
    path = os.path.realpath(data_file)
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == path:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            maps.append((lo, hi, int(fields[2], 16)))

    def offset(view: memoryview) -> int:
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        for lo, hi, file_offset in maps:
            if lo <= address < hi:
                return address - lo + file_offset
        raise SystemExit(f"{data_file} is not mapped where the store's pages are")

    return store.with_page_locations(digests, lambda views, *_: [offset(v) for v in views])


def synced(device: str, fn: Callable[[], Any]) -> tuple[float, Any]:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, result


def check_loaded(codec: PageCodec, blocks: list[int], digests: list[bytes]) -> None:
    """The loaded blocks hold exactly the stored pages (a sample of 64 blocks)."""
    step = max(1, len(blocks) // 64)
    sample = list(range(0, len(blocks), step))
    staging = codec.new_staging(len(sample))
    codec.gather([blocks[i] for i in sample], staging)
    rows = staging.view(torch.uint8).numpy().reshape(2 * len(sample), -1)
    for j, i in enumerate(sample):
        if page_digest(rows[2 * j]) != digests[2 * i] or page_digest(rows[2 * j + 1]) != digests[2 * i + 1]:
            raise SystemExit(f"block {blocks[i]} does not hold the pages it was loaded from")


def run(opts: argparse.Namespace) -> dict[str, Any]:
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    page_bytes = LAYERS * HEADS * BLOCK * HEAD_DIM * 2
    n = max(2, int(opts.gib * GiB) // (2 * page_bytes))
    nbytes = 2 * n * page_bytes
    work = Path(opts.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"{n} blocks, {nbytes / GiB:.2f} GiB of {page_bytes >> 10} KiB pages on {device}; "
          f"threads {opts.threads}; store {work}", flush=True)
    layers = kv_layers(2 * n, device)  # the blocks saved, and as many again to load into
    codec = codec_for("FLASH_ATTN" if device == "cuda" else "CPU_ATTN", layers,
                      head_dim=HEAD_DIM)
    rng = np.random.default_rng(1)
    order = rng.permutation(2 * n).tolist()
    saved, targets = order[:n], order[n:]
    results: dict[str, Any] = {"device": device, "bytes": nbytes, "page_bytes": page_bytes,
                               "machine": machine(device), "threads": {}, "cpu_s": {}}
    with Store(work / "store") as store:
        digests: list[bytes] = []

        def commit(items: list[tuple[bytes, memoryview | None]], blocks: int, last: bool) -> None:
            result = store.put_pages_hashed(items, pin="bench")
            digests.extend(result.digests)
            new[0] += sum(result.new)

        new = [0]
        path = StagedPagePath(codec, verify=True, threads=opts.threads[0])
        t, _ = synced(device, lambda: path.save(saved, None, commit, present=store.has_pages))
        path.close()
        results["save_empty_store_s"] = t
        print(f"save into an empty store: {nbytes / t / 1e9:.2f} GB/s ({t:.2f} s, disk-bound)",
              flush=True)
        assert new[0] == 2 * n and len(digests) == 2 * n
        data_file = str(work / "store" / "data.mdb")
        offsets = page_offsets(store, digests, data_file)
        with open(data_file, "rb") as f:  # the page cache holds the store, as in the checkout
            while f.read(64 << 20):
                pass
        host_rows = np.empty((2 * n, page_bytes), dtype=np.uint8)
        store.read_pages_into(digests, host_rows, page_bytes, verify=False)
        if device == "cuda":
            results["copies"] = copy_seconds(nbytes, cuda=True)
    for threads, reader, staging in itertools.product(opts.threads, opts.reader,
                                                      opts.staging or [None]):
        for run_mib in (opts.run_mib or [None]) if reader == "python" else [None]:
            label = (f"{threads} threads, {READER_LABELS[reader]}"
                     + (f", runs of {run_mib:g} MiB" if opts.run_mib else "")
                     + (f", staging {staging}" if staging else ""))
            run_bytes = RUN_BYTES if run_mib is None else int(run_mib * (1 << 20))
            results["threads"][label], results["cpu_s"][label] = rounds(
                opts, work / "store", codec, device, threads, run_bytes, saved, targets,
                digests, host_rows, data_file, offsets, reader=reader,
                staging=_staging(staging))
    shutil.rmtree(work, ignore_errors=True)
    return results


def _staging(spec: str | None) -> dict[str, int] | None:
    """``MIBxSLOTS`` (e.g. ``512x4``, the default): the staging memory and its slot count."""
    if spec is None:
        return None
    mib, _, slots = spec.partition("x")
    return {"staging_bytes": int(mib) << 20, "slots": int(slots or 4)}


def rounds(opts: argparse.Namespace, path: Path, codec: PageCodec, device: str, threads: int,
           run_bytes: int, saved: list[int], targets: list[int], digests: list[bytes], host_rows: np.ndarray,
           data_file: str, offsets: list[int], *, reader: str,
           staging: dict[str, int] | None = None,
           ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall seconds and the process's CPU seconds of every round of every measure."""
    native = reader != "python"
    mode = "map" if reader.startswith("map") else "pread"
    slots: dict[str, Any] = dict(staging or {})
    slots["streaming_stores"] = reader != "map-cached"
    verified = StagedPagePath(codec, verify=True, threads=threads, run_bytes=run_bytes,
                              native=native, reader=mode, **slots)
    unverified = StagedPagePath(codec, verify=False, threads=threads, run_bytes=run_bytes,
                                native=native, reader=mode, **slots)
    if native and verified.native is None:
        raise SystemExit("the native page reader did not build here (it needs a C compiler)")
    if mode == "map" and not verified.from_map:
        raise SystemExit("the compiled reader cannot copy from the map here (python-xxhash "
                         "exports no streaming xxh3)")
    ceilings = Ceilings(host_rows, len(verified._slots) * 2 * verified.chunk_blocks, data_file,
                        offsets, threads)
    jobs = ["bench"] * len(targets)
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def warm_save(store: Store) -> None:
        new = [0]

        def commit(items: list[tuple[bytes, memoryview | None]], blocks: int, last: bool) -> None:
            new[0] += sum(store.put_pages_hashed(items, pin="bench").new)

        verified.save(saved, None, commit, present=store.has_pages)
        if new[0]:
            raise SystemExit(f"the warm-store save wrote {new[0]} pages")

    def load(path: StagedPagePath, source: Store) -> None:
        outcome = path.load(source, targets, digests, jobs)
        if outcome.bad_blocks:
            raise SystemExit(f"{len(outcome.bad_blocks)} blocks failed their check")

    measures: dict[str, Callable[[Store], Any]] = {
        "memcpy": lambda _: ceilings.memcpy(), "xxh3": lambda _: ceilings.xxh3(),
        "pread": lambda _: ceilings.pread(), "pread+xxh3": lambda _: ceilings.pread(verify=True),
        **({"pread+xxh3, pinned": lambda _: ceilings.pread(verify=True, pinned=True)}
           if device == "cuda" else {}),
        "load": lambda s: load(verified, s),
        "load, map in use": lambda s: load(verified, s),
        "load, verify off": lambda s: load(unverified, s),
        "save, warm store": warm_save,
    }
    if opts.diagnose:
        # Not the product: the load with its device copies left out, to tell the host half's
        # own speed from what running beside the device copies costs it.
        host_only = StagedPagePath(codec, verify=True, threads=threads, run_bytes=run_bytes,
                                   native=native, reader=mode, **slots)
        host_only._to_blocks = lambda *_: None  # type: ignore[method-assign]
        measures["diagnose: load, host half"] = lambda s: load(host_only, s)
    # Every measure opens the store afresh (the only handle, so a new map), as a fresh engine
    # does; "map in use" loads once untimed first, as a later checkout in the same engine finds.
    with Store(path) as again:
        load(verified, again)  # warm-up: first use of the pool, the file and the staging slots
        check_loaded(codec, targets, digests)
    for _ in range(opts.repeat):
        for name, fn in measures.items():
            with Store(path) as fresh:
                if name == "load, map in use":
                    fn(fresh)
                started = time.process_time()
                times.setdefault(name, []).append(
                    synced(device, lambda fn=fn, fresh=fresh: fn(fresh))[0])
                cpu.setdefault(name, []).append(time.process_time() - started)
    for staged in (verified, unverified, *([host_only] if opts.diagnose else [])):
        staged.close()
    ceilings.close()
    return times, cpu


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "xxhash": xxhash.VERSION,
                            "default_copy_threads": default_copy_threads()}
    try:
        info["affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def report(results: dict[str, Any]) -> None:
    nbytes = results["bytes"]
    copies = results.get("copies", {})
    for label, times in results["threads"].items():
        print(f"\n{nbytes / GiB:.2f} GiB, {label}, {results['device']} "
              f"({results['machine'].get('cpu', '?')}, {results['machine']['cpus']} CPUs): "
              "GB/s best (median), CPU s/GiB (median)")
        rates = {k: (nbytes / min(v) / 1e9, nbytes / statistics.median(v) / 1e9)
                 for k, v in times.items()}
        for key, value in copies.items():
            rates[f"pinned {key.upper()}"] = (nbytes / value / 1e9, nbytes / value / 1e9)
        cpu = results.get("cpu_s", {}).get(label, {})
        for name, (best, med) in rates.items():
            per_gib = (f"   {statistics.median(cpu[name]) * GiB / nbytes:6.3f}"
                       if name in cpu else "")
            print(f"  {name:<18} {best:7.2f} ({med:6.2f}){per_gib}")
        memcpy, xxh = rates["memcpy"][0], rates["xxh3"][0]
        print(f"  load / memcpy {rates['load'][0] / memcpy:.2f}, load / pread+xxh3 "
              f"{rates['load'][0] / rates['pread+xxh3'][0]:.2f}, warm save / xxh3 "
              f"{rates['save, warm store'][0] / xxh:.2f}"
              + (f", load / H2D {rates['load'][0] / rates['pinned H2D'][0]:.2f}, warm save / D2H "
                 f"{rates['save, warm store'][0] / rates['pinned D2H'][0]:.2f}" if copies else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="bytes of pages in the store")
    parser.add_argument("--threads", type=int, nargs="+", default=[default_copy_threads()],
                        help="copy threads of the staged path (default: its own default)")
    parser.add_argument("--run-mib", type=float, nargs="+", default=None,
                        help="page MiB per preadv of the load, each measured in turn (0: one page "
                             "per call; default: the path's own)")
    parser.add_argument("--reader", choices=sorted(READER_LABELS), nargs="+",
                        default=["map", "native"],
                        help="how the copy threads read and hash, each measured in turn: a slice "
                             "per call in C without the GIL, copied out of the store's map "
                             "(map) or read with pread (native); or a Python call per page to "
                             "read and one to hash (python; --run-mib applies to this one)")
    parser.add_argument("--staging", nargs="+", default=None, metavar="MIBxSLOTS",
                        help="staging memory and slots of the path, each measured in turn "
                             "(default: the path's own, 512x4)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--work", default=str(REPO / ".bench" / "page_path"))
    parser.add_argument("--json", help="also write the raw times here")
    parser.add_argument("--diagnose", action="store_true",
                        help="also time the load without its device copies (not the product)")
    opts = parser.parse_args()
    results = run(opts)
    report(results)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
