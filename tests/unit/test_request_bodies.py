"""Request bodies are parsed once: the second encoding that finds a lone UTF-16 surrogate runs
only for a body that may hold one, and every body that does is still refused."""

from __future__ import annotations

import json

import pytest
from processfork.plugin.api_errors import ApiError
from processfork.plugin.api_models import SnapshotBody
from processfork.plugin.routes import _may_hold_surrogates, _parse

LONE = ["\ud800", "\udfff", "a\udc00b"]


def _bodies_with_a_lone_surrogate() -> list[bytes]:
    out = []
    for text in LONE:
        value = {"name": text, "token_ids": [1, 2]}
        escaped = json.dumps(value).encode()  # \ud800
        out.append(escaped)
        out.append(escaped.replace(b"\\ud", b"\\uD"))  # \uD800: either case
        out.append(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        out.append(json.dumps(value, ensure_ascii=False).encode("utf-16", "surrogatepass"))
    return out


@pytest.mark.parametrize("raw", _bodies_with_a_lone_surrogate())
def test_every_body_with_a_lone_surrogate_is_refused(raw: bytes):
    assert _may_hold_surrogates(raw)
    with pytest.raises(ApiError) as err:
        _parse(raw, SnapshotBody)
    assert err.value.status == 400 and "surrogate" in err.value.message


def test_a_body_of_token_ids_is_not_encoded_again():
    raw = json.dumps({"name": "long", "token_ids": list(range(32768))}).encode()
    assert not _may_hold_surrogates(raw)
    assert len(_parse(raw, SnapshotBody).token_ids) == 32768


def test_escapes_that_are_no_surrogates_and_pairs_parse():
    for name in ("caf\u00e9", "\U0001f600"):  # a pair: \ud83d\ude00
        raw = json.dumps({"name": name, "token_ids": [1]}).encode()
        assert _parse(raw, SnapshotBody).name == name
