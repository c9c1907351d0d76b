"""A pack's body as boto3 reads it: the objects' views back to back, never joined into one buffer.

An upload reads it in whatever sizes its HTTP client, its hashing and its checksums ask, rewinds
it, and reads it again for a retry; every way of reading must give the pack's bytes exactly.
"""

from __future__ import annotations

import io
import random

import pytest
from processfork.store.remote.pack import PackBody


def _parts(seed: int) -> list[memoryview]:
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 7, 4096, 70_000]) for _ in range(40)]
    return [memoryview(rng.randbytes(n)) for n in sizes]


def _drain(body: PackBody, size: int) -> bytes:
    out = io.BytesIO()
    while piece := body.read(size):
        out.write(piece)
    return out.getvalue()


@pytest.mark.parametrize("size", [1, 1000, 16384, 1 << 20])
@pytest.mark.parametrize("min_read", [1, 8192, 8 << 20])
def test_every_read_size_gives_the_pack_bytes_exactly(size, min_read):
    parts = _parts(size + min_read)
    whole = b"".join(parts)
    body = PackBody(parts, min_read=min_read)
    assert len(body) == len(whole)
    assert _drain(body, size) == whole
    assert body.read(size) == b"" and body.tell() == len(whole)


def test_a_read_hands_out_the_rest_of_one_object_whatever_size_is_asked():
    """http.client asks for 16 KiB at a time; a 384 KiB object goes in one send."""
    parts = [memoryview(bytes(384 << 10)), memoryview(b"x" * 100)]
    body = PackBody(parts, min_read=1 << 20)
    assert len(body.read(16384)) == 384 << 10
    assert bytes(body.read(16384)) == b"x" * 100
    body = PackBody(parts, min_read=1000)
    assert len(body.read(16384)) == 16384  # cut at max(size, min_read)


def test_seek_tell_and_read_all_after_a_partial_read():
    parts = _parts(3)
    whole = b"".join(parts)
    body = PackBody(parts, min_read=100)
    for pos in (0, 1, 4096, len(whole) // 2, len(whole) - 1, len(whole)):
        assert body.seek(pos) == pos == body.tell()
        assert _drain(body, 333) == whole[pos:]
    body.seek(0)
    first = bytes(body.read(10))
    assert whole.startswith(first) and body.tell() == len(first)
    assert body.read() == whole[len(first) :] and body.tell() == len(whole)
    body.seek(10)
    assert body.read(-1) == whole[10:] and body.read() == b""
    body.seek(-5, 2)
    assert _drain(body, 2) == whole[-5:]
    body.seek(3)
    body.seek(4, 1)
    assert _drain(body, 50) == whole[7:]


def test_an_empty_pack():
    body = PackBody([])
    assert len(body) == 0 and body.read(10) == b"" and body.read() == b""
