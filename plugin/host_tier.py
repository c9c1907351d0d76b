"""Pages kept in host memory that outlives the engine and that a GPU can copy from directly.

A checkout from the store moves every page through host memory once (the page cache, then a
pinned staging buffer) before the GPU copies it; on an H200 that host copy, not PCIe, bounds a
restore (docs/benchmarks.md). The host tier removes it for pages used recently: a file in a
shared-memory directory (``/dev/shm`` by default), mapped by the worker and registered with CUDA
(``cudaHostRegister``), so a page in it goes to the GPU in one DMA, and its check (xxh3 of the
page) runs in host threads while the copy is in flight.

Why a file in shared memory and not pinned memory of the worker's own: a tier that dies with the
engine would be empty exactly when a checkout matters, after a restart. The file survives the
engine (not the machine); the next engine on the same store maps it again and finds its pages.

What keeps it safe:

- It is a cache of the store, keyed by page digest. Every page read from it is checked against
  its digest like a page read from the store (when loads are verified); a page that fails is
  dropped and its block recomputed.
- One engine at a time: the file is locked (``flock``) for as long as an engine maps it; another
  engine on the same store runs without a tier.
- A slot's digest is written after its bytes and cleared before they change, so an engine killed
  mid-write leaves a slot with no digest (free), never a digest over other bytes.
- The file's header names the page size; a tier made for other pages is emptied on open.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["DIGEST_BYTES", "HostTier", "TierBusy", "tier_file_path"]

MAGIC = b"PFTIER01"
DIGEST_BYTES = 16
HEADER_BYTES = 4096
ALIGN = 2 << 20  # the data area starts on a 2 MiB boundary: huge pages and DMA like it
EMPTY = bytes(DIGEST_BYTES)


class TierBusy(RuntimeError):
    """Another live engine holds the tier of this store."""


def tier_file_path(directory: str, store_path: str, page_bytes: int) -> Path:
    """One tier per (store, page size, user): engines of other stores or shapes never share it."""
    key = hashlib.sha256(f"{os.path.realpath(store_path)}\0{page_bytes}".encode()).hexdigest()
    return Path(directory) / f"processfork-tier-{os.getuid()}-{key[:16]}"


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class HostTier:
    """A fixed number of page slots in a shared-memory file, with an LRU index by digest.

    Thread-safe: the page path's copy threads publish and look up pages concurrently.
    """

    def __init__(self, path: Path, page_bytes: int, capacity_bytes: int):
        if page_bytes < 1 or capacity_bytes < page_bytes:
            raise ValueError("a host tier needs room for at least one page")
        self.path = Path(path)
        self.page_bytes = page_bytes
        self.num_slots = capacity_bytes // page_bytes
        self._table_bytes = self.num_slots * DIGEST_BYTES
        self._data_offset = _round_up(HEADER_BYTES + self._table_bytes, ALIGN)
        self.file_bytes = self._data_offset + self.num_slots * page_bytes
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise TierBusy(f"another engine uses the host tier {self.path}") from None
        try:
            self._map = self._open_map()
        except BaseException:
            os.close(self._fd)
            raise
        buf = np.frombuffer(self._map, dtype=np.uint8)
        self._table = buf[HEADER_BYTES : HEADER_BYTES + self._table_bytes].reshape(
            self.num_slots, DIGEST_BYTES)
        self.rows = buf[self._data_offset :].reshape(self.num_slots, page_bytes)
        self._index: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # valid slots, least recent first
        self._free: list[int] = []
        self._recover()
        self._unpin: Callable[[], None] | None = None

    def _open_map(self) -> mmap.mmap:
        header = MAGIC + np.array([self.page_bytes, self.num_slots], dtype="<u8").tobytes()
        current = os.pread(self._fd, len(header), 0)
        if current != header or os.fstat(self._fd).st_size != self.file_bytes:
            # Another page size or capacity, a stranger's file, or a fresh one: start empty.
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.file_bytes)
            os.pwrite(self._fd, header, 0)
        # Take the memory now: a write into a tmpfs page that cannot be allocated kills the
        # process (SIGBUS), where this fails cleanly (ENOSPC) and the engine runs without a tier.
        os.posix_fallocate(self._fd, 0, self.file_bytes)
        return mmap.mmap(self._fd, self.file_bytes, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE)

    def _recover(self) -> None:
        """Index what the previous engine left; a digest seen twice keeps its first slot."""
        nonzero = np.flatnonzero(self._table.any(axis=1))
        valid = {int(s) for s in nonzero}
        for slot in nonzero:
            digest = self._table[slot].tobytes()
            if digest in self._index:
                self._table[slot] = 0
                valid.discard(int(slot))
                continue
            self._index[digest] = int(slot)
            self._lru[int(slot)] = None
        self._free = [s for s in range(self.num_slots - 1, -1, -1) if s not in valid]

    # -- pinning ---------------------------------------------------------------------------
    def pin(self, register: Callable[[int, int], Callable[[], None]]) -> None:
        """Register the data area for DMA; ``register(address, nbytes)`` returns its undo."""
        address = self.rows.ctypes.data
        self._unpin = register(address, self.rows.nbytes)

    # -- index -----------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __contains__(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._index

    def lookup(self, digests: Sequence[bytes]) -> list[int | None]:
        """Each digest's slot (None when absent); found slots become most recently used."""
        with self._lock:
            slots = [self._index.get(d) for d in digests]
            for slot in slots:
                if slot is not None:
                    self._lru.move_to_end(slot)
            return slots

    def reserve(self, count: int, keep: Iterable[int] = (), before_reuse: Callable[[], None]
                | None = None) -> list[int]:
        """Up to ``count`` slots to write pages into: free ones first, then the least recently
        used, never one in ``keep``. A reused slot loses its digest before this returns; when
        any is reused, ``before_reuse()`` runs first (it waits for copies still reading one)."""
        keep = set(keep)
        with self._lock:
            taken = [self._free.pop() for _ in range(min(count, len(self._free)))]
            evicted: list[int] = []
            if len(taken) < count:
                for slot in list(self._lru):
                    if len(taken) + len(evicted) >= count:
                        break
                    if slot in keep:
                        continue
                    evicted.append(slot)
                for slot in evicted:
                    self._drop(slot)
            if evicted and before_reuse is not None:
                before_reuse()
            return taken + evicted

    def publish(self, slot: int, digest: bytes) -> None:
        """Make the bytes written to ``slot`` findable under ``digest``."""
        with self._lock:
            other = self._index.get(digest)
            if other is not None and other != slot:
                self._release(slot)  # a copy raced us to it: keep one
                return
            self._table[slot] = np.frombuffer(digest, dtype=np.uint8)
            self._index[digest] = slot
            self._lru[slot] = None
            self._lru.move_to_end(slot)

    def release(self, slots: Iterable[int]) -> None:
        """Give back reserved slots that were not published."""
        with self._lock:
            for slot in slots:
                self._release(slot)

    def discard(self, digests: Iterable[bytes]) -> None:
        """Forget pages found corrupt: their slots become free."""
        with self._lock:
            for digest in digests:
                slot = self._index.get(digest)
                if slot is not None:
                    self._drop(slot)
                    self._free.append(slot)

    def _drop(self, slot: int) -> None:
        digest = self._table[slot].tobytes()
        self._table[slot] = 0
        self._lru.pop(slot, None)
        if self._index.get(digest) == slot:
            del self._index[digest]

    def _release(self, slot: int) -> None:
        if self._table[slot].any():
            return
        self._free.append(slot)

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Unregister and unmap; the file and its pages stay for the next engine."""
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
        del self.rows, self._table
        try:
            self._map.close()
        except BufferError:
            pass  # a view still exists somewhere; the map goes with the process
        os.close(self._fd)  # releases the lock


def cuda_register(address: int, nbytes: int) -> Callable[[], None]:
    """Page-lock host memory for DMA (``cudaHostRegister``); returns the undo."""
    import torch

    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(address, nbytes, 0)
    if int(err) != 0:
        _consume_cuda_error(torch)
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (CUDA error {int(err)})")

    def unregister() -> None:
        cudart.cudaHostUnregister(address)

    return unregister


def _consume_cuda_error(torch) -> None:  # torch: imported by the caller
    """Clear the error a failed runtime call left: it sticks to the thread until read, and the
    engine's next kernel launch would report it as its own (and fail the engine's start). A
    launch check reads it; the binding torch offers has no ``cudaGetLastError``."""
    try:
        torch.ones(1, device="cuda").add_(1)
    except RuntimeError:
        pass


TMPFS = ("tmpfs", "hugetlbfs", "ramfs")


def filesystem_type(path: str) -> str | None:
    """The type of the file system that holds ``path`` (from /proc/self/mounts), if known."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind
