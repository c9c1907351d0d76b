"""Where this process maps the store's data file, so that pages can be read with ``pread``.

LMDB hands out zero-copy views into its memory map but does not say where the map starts (its
``map_addr`` is 0 unless the map is fixed), and a reader that wants a page's offset in the file,
to ``pread`` it from the page cache instead of faulting the map in 4 KiB at a time, needs that.
The kernel knows: ``/proc/self/maps`` lists each mapping with its file and file offset.
"""

from __future__ import annotations

import os

__all__ = ["file_map_base"]


def file_map_base(path: str, maps: str = "/proc/self/maps") -> int | None:
    """The address at which this process maps ``path`` from file offset 0.

    None when that is not exactly one mapping (no ``/proc``, the file mapped twice, or not at
    all): the caller then copies from the map, which is never wrong, only slower.
    """
    target = os.path.realpath(path)
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # One mmap may be listed as several consecutive areas (after an madvise, say): only the
    # first is at file offset 0, and the map runs on from its start.
    starts = []
    for line in lines:
        # start-end perms offset dev inode path (the path may hold spaces)
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target and int(fields[2], 16) == 0:
            starts.append(int(fields[0].partition("-")[0], 16))
    return starts[0] if len(starts) == 1 else None
