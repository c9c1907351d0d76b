"""Reading stored pages from the store's data file with ``preadv``, one page or a run per call.

A fresh worker has never touched the store's map: copying a checkout's gigabytes out of it takes
a page fault every few pages, where ``pread`` copies from the page cache with the GIL released.
Each page still costs a round of Python work under the GIL, which the copy threads and the
thread that launches the device copies take turns at. Three things cut it:

- the compiled reader (``native_pages.py``, the default) reads and checks a thread's whole
  slice in one call without the GIL (``read_checked``);
- the data pointer of each page's numpy view is read without ``__array_interface__`` or
  ``.ctypes`` (each builds an object per call, and cost more than the view itself;
  ``native_pages.data_pointers``);
- LMDB keeps each large value in overflow pages, and the values written in one commit usually
  lie one after another in the file, a header and the tail of a 4 KiB page apart, so a run of
  such pages can be read with one ``preadv`` whose iovecs alternate between the pages' rows and
  a scratch buffer that takes the bytes between them (``run_bytes``; off by default, see
  ``RUN_BYTES``). Pages out of order, far apart, or outside the file keep a ``pread`` each (or,
  failing that, a copy from the map), which is never wrong, only slower.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from processfork.store import page_digest

from .native_pages import MISMATCH, NOT_READ, NativePages, data_pointers

__all__ = ["PageFile", "iov_max", "plan_runs"]

#: Pages at most this far apart in the file share a ``preadv``: the bytes between two values of
#: one commit are LMDB's 16-byte overflow header and the unused tail of the last 4 KiB page.
RUN_GAP_BYTES = 64 << 10
#: Page bytes per ``preadv`` at most; 0 (or less than two pages), the default, reads every page
#: on its own. A run saves a call and a GIL hand-off per page, but its pages are checked only
#: once the call has read them all: on a 2-core x86-64 VM a load of 1 MiB pages took 6-10% more
#: CPU time with runs of 2 to 16 MiB than with one ``pread`` per page hashed at once, and no run
#: size won. Where the GIL rather than CPU time limits a load (many copy threads), runs may pay:
#: ``bench/page_path_bench.py --run-mib 0 8`` measures both.
RUN_BYTES = 0


def iov_max() -> int:
    """How many buffers one ``preadv`` may take (1024 on Linux; POSIX promises at least 16)."""
    try:
        limit = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError, AttributeError):
        return 16
    return limit if limit > 0 else 16


IOV_MAX = iov_max()




def plan_runs(offsets: Sequence[int], page_bytes: int, *, gap_bytes: int = RUN_GAP_BYTES,
              run_bytes: int = RUN_BYTES, max_iov: int = IOV_MAX) -> list[tuple[int, int]]:
    """Cut ``range(len(offsets))`` into runs ``[lo, hi)`` of pages that one ``preadv`` can read.

    A page joins the run before it when it starts after that run's last page ends, at most
    ``gap_bytes`` later, and the run then stays within ``run_bytes`` bytes of pages and
    ``max_iov`` buffers (a page, plus a scratch buffer for a gap). A negative offset (a page
    that is not in the file) is a run of its own. Every index is in exactly one run, in order.
    """
    if run_bytes < 2 * page_bytes:
        return [(i, i + 1) for i in range(len(offsets))]
    runs: list[tuple[int, int]] = []
    if not offsets:
        return runs
    lo, size, iov = 0, page_bytes, 1
    for i in range(1, len(offsets)):
        prev = offsets[i - 1]
        gap = offsets[i] - prev - page_bytes
        more = 2 if gap else 1
        if (prev >= 0 and 0 <= gap <= gap_bytes and size + page_bytes <= run_bytes
                and iov + more <= max_iov):
            size += page_bytes
            iov += more
        else:
            runs.append((lo, i))
            lo, size, iov = i, page_bytes, 1
    runs.append((lo, len(offsets)))
    return runs


@dataclass(frozen=True)
class PageFile:
    """The store's data file, open for reading pages at their offsets instead of through the map.

    ``map_base`` is where this process maps the file (``Store.with_page_locations``); None, or no
    ``fd``, means every page is copied from the map.
    """

    fd: int | None
    map_base: int | None
    gap_bytes: int = RUN_GAP_BYTES
    run_bytes: int = RUN_BYTES
    max_iov: int = IOV_MAX
    #: The compiled reader (``native_pages.py``): one call per slice without the GIL.
    native: NativePages | None = None
    #: With the compiled reader: copy pages out of the store's memory map (hashed a piece at a
    #: time just before each piece is copied, stored past the caches) instead of ``pread``.
    from_map: bool = False
    #: Copies from the map write past the CPU's caches (``NativePages.copy_pages``).
    streaming_stores: bool = True

    def offsets(self, views: Sequence[memoryview]) -> list[int] | None:
        """Each view's offset in the file (negative: not in it); None when there is no file."""
        if self.fd is None or self.map_base is None:
            return None
        base, view_of, u8 = self.map_base, np.frombuffer, np.uint8
        arrays = [view_of(v, u8) for v in views]
        return [address - base for address in data_pointers(arrays)]

    def read_checked(self, rows: Sequence[np.ndarray], views: Sequence[memoryview],
                     expected: Sequence[bytes] | None) -> list[int]:
        """Fill ``rows[i]`` with the page ``views[i]`` shows: the indexes whose bytes do not
        match ``expected[i]`` (none checked without ``expected``).

        With the compiled reader (and no runs asked for), the slice is read and hashed in one
        call without the GIL, and only pages it could not read (not in the file) are copied from
        the map here.
        """
        page_bytes = rows[0].nbytes if len(rows) else 0
        if (self.from_map and self.native is not None
                and (expected is None or self.native.copies_from_map)):
            u8 = np.uint8
            status = self.native.copy_pages([np.frombuffer(v, u8) for v in views], rows,
                                            expected, streaming_stores=self.streaming_stores)
            return [int(i) for i in np.flatnonzero(status == MISMATCH)]
        native = self.native is not None and self.run_bytes < 2 * page_bytes  # runs: asked for
        offsets = self.offsets(views) if native else None
        if offsets is None or self.fd is None:
            bad: list[int] = []
            for lo, hi in self.read_pages(rows, views):
                if expected is not None:
                    bad += [i for i in range(lo, hi) if page_digest(rows[i]) != expected[i]]
            return bad
        assert self.native is not None
        status = self.native.read_pages(self.fd, offsets, rows, expected)
        bad = [int(i) for i in np.flatnonzero(status == MISMATCH)]
        for i in np.flatnonzero(status == NOT_READ):
            np.copyto(rows[i], np.frombuffer(views[i], dtype=np.uint8))
            if expected is not None and page_digest(rows[i]) != expected[i]:
                bad.append(int(i))
        return sorted(bad)

    def read_one(self, row: np.ndarray, offset: int) -> bool:
        """``pread`` one page at ``offset`` into ``row``; False when it must come from the map."""
        if self.fd is None or offset < 0:
            return False
        try:
            return os.preadv(self.fd, [row], offset) == row.nbytes
        except OSError:
            return False

    def read_pages(self, rows: Sequence[np.ndarray], views: Sequence[memoryview]
                   ) -> Iterator[tuple[int, int]]:
        """Fill ``rows[i]`` with the page ``views[i]`` shows, yielding each ``[lo, hi)`` once its
        rows hold their pages (the caller checks them while they are in the CPU's caches)."""
        offsets = self.offsets(views)
        if offsets is None:
            for i, (row, view) in enumerate(zip(rows, views)):
                np.copyto(row, np.frombuffer(view, dtype=np.uint8))
                yield i, i + 1
            return
        page_bytes = rows[0].nbytes if len(rows) else 0
        if self.run_bytes < 2 * page_bytes:  # no runs: skip planning them
            for i, offset in enumerate(offsets):
                if not self.read_one(rows[i], offset):
                    np.copyto(rows[i], np.frombuffer(views[i], dtype=np.uint8))
                yield i, i + 1
            return
        for lo, hi in plan_runs(offsets, page_bytes, gap_bytes=self.gap_bytes,
                                run_bytes=self.run_bytes, max_iov=self.max_iov):
            if hi - lo == 1 or not self._read_run(rows, offsets, lo, hi):
                for i in range(lo, hi):
                    if not self.read_one(rows[i], offsets[i]):
                        np.copyto(rows[i], np.frombuffer(views[i], dtype=np.uint8))
            yield lo, hi

    def _read_run(self, rows: Sequence[np.ndarray], offsets: Sequence[int], lo: int, hi: int
                  ) -> bool:
        """One ``preadv`` of pages ``lo..hi-1`` and the gaps between them; False on a short read
        (the file ends early) or an error, and the caller reads those pages one by one."""
        page_bytes = rows[lo].nbytes
        gaps = [offsets[i + 1] - offsets[i] - page_bytes for i in range(lo, hi - 1)]
        scratch = memoryview(bytearray(max(gaps)))
        iov: list[object] = [rows[lo]]
        for i, gap in zip(range(lo + 1, hi), gaps):
            if gap:
                iov.append(scratch[:gap])
            iov.append(rows[i])
        total = offsets[hi - 1] + page_bytes - offsets[lo]
        try:
            return os.preadv(self.fd, iov, offsets[lo]) == total  # type: ignore[arg-type]
        except OSError:
            return False
