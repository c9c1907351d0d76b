"""Reading and hashing a slice of pages in one call without the GIL (``page_io.c``, via ctypes).

The staged page path's copy threads used to make two Python calls per page: one ``preadv``,
one xxh3. Each releases the GIL for the bytes, then takes it back, so with 8-16 threads the
threads queue for the GIL between pages: on a 16-core H200 host a 4 GiB load ran at 13.7 GB/s
with 16 threads where the bare reads and hashes of the same threads ran at 37.7. Here a thread
hands its whole slice to C once (ctypes releases the GIL for a foreign call), and the only
Python work per page left is building the call's arrays.

The C file is compiled on first use with the machine's C compiler into a cache directory
(``PROCESSFORK_CACHE_DIR``, else ``$XDG_CACHE_HOME/processfork``, else ``~/.cache/processfork``),
one file per source and machine; xxh3 is python-xxhash's own (its exported ``XXH3_128bits``),
so digests are the store's. Where there is no compiler, or python-xxhash does not export the
function, or ``PROCESSFORK_NATIVE_PAGES=0``, ``native_pages()`` is None and callers keep the
per-page Python calls: slower where the GIL is the limit, never different in what they do.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import xxhash

__all__ = ["MISMATCH", "NOT_READ", "NativePages", "PageFlow", "data_pointers", "native_pages",
           "view_addresses"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("page_io.c")
#: Status of a page after ``read_pages``: read and, when checked, matching (0); not read (the
#: caller copies it from the map); read but not matching its digest.
OK, NOT_READ, MISMATCH = 0, 1, 2

_u8p = ctypes.POINTER(ctypes.c_uint8)
_i64p = ctypes.POINTER(ctypes.c_int64)
_vpp = ctypes.POINTER(ctypes.c_void_p)


class NativePages:
    """The compiled ``pf_read_pages`` and ``pf_hash_pages``, bound to python-xxhash's xxh3."""

    def __init__(self, library: ctypes.CDLL, hash_address: int,
                 streaming: tuple[int, ...] | None = None):
        self._read = library.pf_read_pages
        self._read.restype = ctypes.c_int64
        self._read.argtypes = [ctypes.c_int, ctypes.c_int64, _i64p, _vpp, ctypes.c_uint64,
                               _u8p, ctypes.c_void_p, _u8p]
        self._hash = library.pf_hash_pages
        self._hash.restype = None
        self._hash.argtypes = [ctypes.c_int64, _vpp, ctypes.c_uint64, ctypes.c_void_p, _u8p]
        self._xxh3 = hash_address
        # xxh3-128's streaming functions (new state, free, reset, update, digest): a page is
        # hashed a piece at a time as it is copied out of the map. None: only ``read_pages``.
        self._streaming = streaming
        self._copy = library.pf_copy_pages
        self._copy.restype = ctypes.c_int64
        self._copy.argtypes = [ctypes.c_int64, _vpp, _vpp, ctypes.c_uint64, _u8p, ctypes.c_int,
                               ctypes.c_int, *[ctypes.c_void_p] * 5, _u8p]
        self._library = library
        new = library.pf_flow_new
        new.restype = ctypes.c_void_p
        new.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p,
                        ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                        ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 5, ctypes.c_void_p,
                        ctypes.c_int64]
        for name, restype, args in (("pf_flow_work", None, []),
                                    ("pf_flow_wait_chunk", ctypes.c_int, [ctypes.c_int64]),
                                    ("pf_flow_chunk_done", ctypes.c_int, [ctypes.c_int64]),
                                    ("pf_flow_publish", None, [ctypes.c_int64]),
                                    ("pf_flow_release", None, [ctypes.c_int64]),
                                    ("pf_flow_cancel", None, []), ("pf_flow_free", None, [])):
            function = getattr(library, name)
            function.restype = restype
            function.argtypes = [ctypes.c_void_p, *args]

    @property
    def copies_from_map(self) -> bool:
        """Whether ``copy_pages`` can verify pages (python-xxhash exports the streaming API)."""
        return self._streaming is not None

    def read_pages(self, fd: int, offsets: Sequence[int], rows: Sequence[np.ndarray],
                   expected: Sequence[bytes] | None) -> np.ndarray:
        """``pread`` page i at ``offsets[i]`` into ``rows[i]`` and, with ``expected``, compare
        its digest: the status of each page (``OK``, ``NOT_READ``, ``MISMATCH``)."""
        n = len(rows)
        status = np.zeros(n, dtype=np.uint8)
        if not n:
            return status
        page_bytes = rows[0].nbytes
        offs = np.asarray(offsets, dtype=np.int64)
        dests = _addresses(rows)
        want = None
        if expected is not None:
            want = np.frombuffer(b"".join(expected), dtype=np.uint8)
            if len(want) != 16 * n:
                raise ValueError("one 16-byte digest per page expected")
        self._read(fd, n, offs.ctypes.data_as(_i64p), dests.ctypes.data_as(_vpp), page_bytes,
                   None if want is None else want.ctypes.data_as(_u8p), self._xxh3,
                   status.ctypes.data_as(_u8p))
        return status

    def copy_pages(self, sources: Sequence[np.ndarray], rows: Sequence[np.ndarray],
                   expected: Sequence[bytes] | None, *, populate: bool = True,
                   streaming_stores: bool = True) -> np.ndarray:
        """Copy ``sources[i]`` (pages in the store's memory map) into ``rows[i]``, hashing each
        piece just before it is copied and writing past the CPU's caches (``pf_copy_pages``):
        the status of each page (``OK``, or ``MISMATCH`` against ``expected``).

        ``populate``: map each page's part of the map in one ``madvise`` before reading it, not
        a page fault every few 4 KiB (a fresh worker has not touched the map).
        ``streaming_stores``: write the rows past the CPU's caches (x86-64; elsewhere, and for
        rows not 16-byte aligned, a plain copy)."""
        n = len(rows)
        status = np.zeros(n, dtype=np.uint8)
        if not n:
            return status
        if len(sources) != n:
            raise ValueError("one source per row expected")
        page_bytes = rows[0].nbytes
        for source in sources:
            if source.nbytes != page_bytes:
                raise ValueError(f"stored page of {source.nbytes} bytes, expected {page_bytes}")
        want = None
        if expected is not None:
            if self._streaming is None:
                raise RuntimeError("python-xxhash exports no streaming xxh3: pages cannot be "
                                   "verified as they are copied")
            want = np.frombuffer(b"".join(expected), dtype=np.uint8)
            if len(want) != 16 * n:
                raise ValueError("one 16-byte digest per page expected")
        functions = self._streaming or (None,) * 5
        got = self._copy(n, _addresses(sources).ctypes.data_as(_vpp),
                         _addresses(rows).ctypes.data_as(_vpp), page_bytes,
                         None if want is None else want.ctypes.data_as(_u8p), int(populate),
                         int(streaming_stores), *functions, status.ctypes.data_as(_u8p))
        if got < 0:
            raise MemoryError("no memory for an xxh3 state")
        return status

    def flow(self, sources: np.ndarray, slots: Sequence[np.ndarray],
             expected: Sequence[bytes] | None, *, unit_pages: int, populate: bool = True,
             streaming_stores: bool = True, published: int | None = None) -> PageFlow:
        """A load's pages (``sources``: their addresses in the store's map, each one row of the
        slots long) copied into staging ``slots`` by threads that stay in C for the whole load
        (``pf_flow_*``); see ``PageFlow``. ``published``: how many leading addresses are set
        (default all); the rest are set in ``sources`` later and announced with ``publish``."""
        if expected is not None and self._streaming is None:
            raise RuntimeError("python-xxhash exports no streaming xxh3: pages cannot be "
                               "verified as they are copied")
        return PageFlow(self._library, sources, slots, expected, self._streaming or (None,) * 5,
                        unit_pages=unit_pages, populate=populate,
                        streaming_stores=streaming_stores, published=published)

    def hash_pages(self, rows: Sequence[np.ndarray]) -> list[bytes]:
        """The page digest (canonical xxh3-128) of each row."""
        n = len(rows)
        if not n:
            return []
        out = np.empty(16 * n, dtype=np.uint8)
        self._hash(n, _addresses(rows).ctypes.data_as(_vpp), rows[0].nbytes, self._xxh3,
                   out.ctypes.data_as(_u8p))
        raw = out.tobytes()
        return [raw[16 * i : 16 * i + 16] for i in range(n)]


class PageFlow:
    """Page ``p`` of a load into row ``p % rows`` of slot ``(p // rows) % len(slots)``.

    Chunk ``c`` (``rows`` pages, a slot's worth) is filled only after ``release(c)`` (its slot is
    free; chunks below ``len(slots)`` are free at the start). Threads run ``work()`` (one call
    each, without the GIL, until every page is copied or the flow is cancelled); the caller
    waits for each chunk in turn with ``wait(c)`` and hands it on. ``status[p]``: ``MISMATCH``
    where page ``p`` does not match its digest. The arrays the C side reads are kept here, so
    the flow must be closed (``close``) only once no thread runs ``work``.
    """

    def __init__(self, library: ctypes.CDLL, sources: np.ndarray,
                 slots: Sequence[np.ndarray], expected: Sequence[bytes] | None,
                 functions: tuple[int | None, ...], *, unit_pages: int, populate: bool,
                 streaming_stores: bool, published: int | None = None):
        self._lib = library
        pages = len(sources)
        if published is not None and (sources.dtype != np.uint64
                                      or not sources.flags.c_contiguous):
            raise ValueError("addresses published later go into a C-contiguous uint64 array")
        rows, page_bytes = slots[0].shape
        for slot in slots:
            if slot.shape != (rows, page_bytes) or not slot.flags.c_contiguous:
                raise ValueError("staging slots must be C-contiguous arrays of one shape")
        self._sources = np.ascontiguousarray(sources if pages else np.zeros(1), dtype=np.uint64)
        self._slots = np.array([slot.__array_interface__["data"][0] for slot in slots],
                               dtype=np.uint64)
        self._want = None
        if expected is not None:
            self._want = np.frombuffer(b"".join(expected), dtype=np.uint8)
            if len(self._want) != 16 * pages:
                raise ValueError("one 16-byte digest per page expected")
        self.status = np.zeros(max(1, pages), dtype=np.uint8)
        self.chunks = -(-pages // rows)
        self._flow = library.pf_flow_new(
            pages, self._sources.ctypes.data, page_bytes,
            None if self._want is None else self._want.ctypes.data, int(populate),
            int(streaming_stores), rows, len(slots), self._slots.ctypes.data, unit_pages,
            *functions, self.status.ctypes.data, pages if published is None else published)
        if not self._flow:
            raise MemoryError("no memory for a page flow")

    @property
    def sources(self) -> np.ndarray:
        """The page addresses the threads read: set a page's here, then ``publish`` it."""
        return self._sources

    def publish(self, upto: int) -> None:
        """Pages below ``upto`` have their addresses in ``sources`` (0: not in the store, not
        read, status ``NOT_READ``)."""
        self._lib.pf_flow_publish(self._flow, upto)

    def done(self, chunk: int) -> bool:
        """Whether every page of ``chunk`` is copied, without waiting."""
        return bool(self._lib.pf_flow_chunk_done(self._flow, chunk))

    def work(self) -> None:
        self._lib.pf_flow_work(self._flow)

    def wait(self, chunk: int) -> None:
        """Until every page of ``chunk`` is copied; raises if the flow stopped first."""
        result = self._lib.pf_flow_wait_chunk(self._flow, chunk)
        if result == -2:
            raise MemoryError("no memory for an xxh3 state")
        if result:
            raise RuntimeError(f"the page flow stopped before chunk {chunk} was copied")

    def release(self, chunk: int) -> None:
        """Chunks up to ``chunk`` may be filled: their slots are free."""
        self._lib.pf_flow_release(self._flow, chunk)

    def cancel(self) -> None:
        self._lib.pf_flow_cancel(self._flow)

    def close(self) -> None:
        if self._flow:
            self._lib.pf_flow_free(self._flow)
            self._flow = None

    def mismatched(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.status == MISMATCH)]


def _addresses(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Each row's data pointer; the rows must be C-contiguous and of one size."""
    if isinstance(rows, np.ndarray) and rows.ndim == 2 and rows.flags.c_contiguous:
        base = rows.__array_interface__["data"][0]
        return base + np.arange(len(rows), dtype=np.uint64) * np.uint64(rows.shape[1])
    size = rows[0].nbytes
    for row in rows:
        if not row.flags.c_contiguous or row.nbytes != size:
            raise ValueError("rows must be C-contiguous pages of one size")
    return np.array(data_pointers(list(rows)), dtype=np.uint64)


def _data_pointers_reader() -> Callable[[list[np.ndarray]], list[int]]:
    """How this interpreter reads arrays' data pointers, cheaply where it can.

    ``__array_interface__`` and ``.ctypes.data`` build a dict or an object per call, about 6 us
    on a 2-core x86-64 VM where the numpy view itself costs 1 us: per page, under the GIL. On
    CPython, ``id`` is an object's address, and numpy keeps an array's data pointer as the first
    field after the object header (the ``PyArray_DATA`` that compiled extensions inline, so its
    place is fixed); that read is checked once here against ``__array_interface__``, and any
    other interpreter takes the portable way.
    """
    portable: Callable[[list[np.ndarray]], list[int]] = (
        lambda arrays: [a.__array_interface__["data"][0] for a in arrays])
    if sys.implementation.name != "cpython":
        return portable
    at, head = ctypes.c_void_p.from_address, object.__basicsize__
    probe = np.arange(16, dtype=np.uint8)[5:]
    if at(id(probe) + head).value != probe.__array_interface__["data"][0]:
        return portable
    # The caller holds ``arrays``: each is alive while its pointer is read.
    return lambda arrays: [at(id(a) + head).value for a in arrays]


data_pointers = _data_pointers_reader()
"""``data_pointers(arrays)``: each array's data pointer, cheaply (the caller holds the arrays)."""


def _view_addresses_reader() -> Callable[[Sequence[memoryview]], np.ndarray]:
    """How this interpreter reads memoryviews' buffer addresses, cheaply where it can.

    A load of 4 GiB of 1 MiB pages takes 4,096 views from the store; a numpy array of each, to
    read its pointer, cost 7-8 ms of the loading thread's time on a 2-core VM, before any byte
    moves. On CPython a memoryview holds its ``Py_buffer`` inline, whose first field is the
    buffer's address; where that field lies is found once here on two probes, and any other
    interpreter (or a layout the probes do not confirm) takes the portable way.
    """
    u8 = np.uint8

    def portable(views: Sequence[memoryview]) -> np.ndarray:
        return np.array(data_pointers([np.frombuffer(v, u8) for v in views]), dtype=np.uint64)

    if sys.implementation.name != "cpython":
        return portable
    at = ctypes.c_void_p.from_address
    probes = [bytearray(64), bytearray(96)]
    views = [memoryview(probes[0])[3:], memoryview(probes[1])[17:40]]
    wanted = [ctypes.addressof((ctypes.c_char * 64).from_buffer(probes[0])) + 3,
              ctypes.addressof((ctypes.c_char * 96).from_buffer(probes[1])) + 17]
    # Only inside the object itself: nothing past its end is read.
    found = [offset for offset in range(object.__basicsize__, memoryview.__basicsize__,
                                        ctypes.sizeof(ctypes.c_void_p))
             if all(at(id(v) + offset).value == w for v, w in zip(views, wanted))]
    del views
    if len(found) != 1:
        return portable
    offset = found[0]

    def fast(views: Sequence[memoryview]) -> np.ndarray:
        # The caller holds ``views``: each is alive while its address is read.
        return np.array([at(id(v) + offset).value for v in views], dtype=np.uint64)

    return fast


view_addresses = _view_addresses_reader()
"""``view_addresses(views)``: each memoryview's buffer address (the caller holds the views)."""


_lock = threading.Lock()
_loaded: list[NativePages | None] = []


def native_pages() -> NativePages | None:
    """The compiled page reader, built on first call; None where it cannot be (logged once)."""
    with _lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def _load() -> NativePages | None:
    if os.environ.get("PROCESSFORK_NATIVE_PAGES", "1").strip().lower() in ("0", "false", "no"):
        return None
    hash_address = _xxh3_address()
    if hash_address is None:
        logger.warning("processfork: python-xxhash exports no XXH3_128bits; pages are read "
                       "and hashed one Python call each")
        return None
    try:
        library = ctypes.CDLL(str(_compiled()))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("processfork: the native page reader could not be built (%s); pages "
                       "are read and hashed one Python call each", exc)
        return None
    return NativePages(library, hash_address, _xxh3_streaming())


def _xxh3_streaming() -> tuple[int, ...] | None:
    """The addresses of python-xxhash's xxh3-128 streaming functions: new state, free, reset,
    update (its CPU-dispatching build where it has one), digest; None if any is missing."""
    library = _xxhash_library()
    if library is None:
        return None
    names = (("XXH3_createState",), ("XXH3_freeState",), ("XXH3_128bits_reset",),
             ("XXH3_128bits_update_dispatch", "XXH3_128bits_update"), ("XXH3_128bits_digest",))
    found: list[int] = []
    for choices in names:
        address = next((ctypes.cast(getattr(library, name), ctypes.c_void_p).value
                        for name in choices if hasattr(library, name)), None)
        if address is None:
            return None
        found.append(address)
    return tuple(found)


def _xxhash_library() -> ctypes.CDLL | None:
    module = getattr(xxhash, "_xxhash", None)
    path = getattr(module, "__file__", None)
    if path is None:
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


def _xxh3_address() -> int | None:
    """Where python-xxhash's xxh3-128 of a buffer is: its CPU-dispatching build where it has
    one (AVX2 or AVX-512 where the CPU has them), else the plain one."""
    library = _xxhash_library()
    if library is None:
        return None
    for name in ("XXH3_128bits_dispatch", "XXH3_128bits"):
        function = getattr(library, name, None)
        if function is not None:
            return ctypes.cast(function, ctypes.c_void_p).value
    return None


def _cache_dir() -> Path:
    explicit = os.environ.get("PROCESSFORK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "processfork"


def _compiler() -> list[str]:
    """The C compiler: ``$CC``, the one Python was built with, else ``cc``."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc",
                      "clang"):
        if not candidate:
            continue
        words = candidate.split()
        if shutil.which(words[0]):
            return words
    raise OSError("no C compiler found (set CC)")


def _compiled() -> Path:
    """The shared library for this source and machine, compiled once and reused after."""
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + platform.machine().encode() + sys.platform.encode())
    name = f"page_io-{tag.hexdigest()[:16]}.so"
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"processfork-{os.getuid()}"):
        target = folder / name
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, scratch = tempfile.mkstemp(suffix=".so", dir=folder)
        except OSError:
            continue
        os.close(fd)
        try:
            subprocess.run([*_compiler(), "-O2", "-shared", "-fPIC", "-pthread", "-o", scratch, str(SOURCE)],
                           check=True, capture_output=True, timeout=120)
            os.replace(scratch, target)  # atomic: processes that build it at once agree
        except subprocess.CalledProcessError as exc:
            Path(scratch).unlink(missing_ok=True)
            raise OSError(exc.stderr.decode(errors="replace").strip()[-300:]) from exc
        except BaseException:
            Path(scratch).unlink(missing_ok=True)
            raise
        return target
    raise OSError("no writable cache directory for the compiled page reader")
