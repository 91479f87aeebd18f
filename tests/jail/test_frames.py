"""The runtime's JSON: one C encoder and scanner made at import give exactly
what json.dumps and json.loads give (a handler's body is json.dumps output)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from jail.runtime import _frames

VALUES: list[Any] = [
    {},
    [],
    {"hello": "world", "n": 1, "f": 1.5, "t": True, "none": None},
    {"nested": {"a": [1, [2, {"b": "c"}]]}, "empty": {"x": []}},
    {"unicode": "héllo ☃ 𝄞", "ctrl": "a\nb\t\"q\"\\", "surrogate": "\ud800"},
    {"big": 10**30, "neg": -0.0, "exp": 1e300, "inf": math.inf, "nan": math.nan},
    {7: "int key", 2.5: "float key", True: "bool key", None: "none key"},
    [{"k": i} for i in range(100)],
]


@pytest.mark.parametrize("value", VALUES)
def test_dumps_is_json_dumps(value: Any) -> None:
    assert _frames.dumps(value) == json.dumps(value)


def test_a_failed_dumps_leaves_nothing_behind() -> None:
    circular: list[Any] = []
    circular.append(circular)
    for bad, error in ((circular, ValueError), ({"x": object()}, TypeError),
                       ([[{"deep": {1, 2}}]], TypeError)):
        with pytest.raises(error) as got:
            _frames.dumps(bad)
        with pytest.raises(error) as expected:
            json.dumps(bad)
        assert str(got.value) == str(expected.value)
        # the same containers again, and new ones: no false "circular reference"
        shared = {"a": [1, 2]}
        assert _frames.dumps([shared, shared]) == json.dumps([shared, shared])
        assert _frames.dumps(VALUES[3]) == json.dumps(VALUES[3])


@pytest.mark.parametrize(
    "raw",
    [b'{"a": 1}', b'{"a":[1,2,{"b":null}]}', b"[]", b'"x"', b"1.5", b'  {"a": 1}  ',
     b'\xef\xbb\xbf{"bom": true}', '{"u": "\u00e9"}'.encode("utf-16"), b'{"s": "\\ud800"}'],
)
def test_loads_is_json_loads(raw: bytes) -> None:
    assert repr(_frames.loads(raw)) == repr(json.loads(raw))


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": 1} x', b"\xff\xfe\xfa", b"nul", b"[1,]"])
def test_loads_fails_as_json_loads_does(raw: bytes) -> None:
    with pytest.raises(ValueError) as got:
        _frames.loads(raw)
    with pytest.raises(ValueError) as expected:
        json.loads(raw)
    assert type(got.value) is type(expected.value)
    assert str(got.value) == str(expected.value)


def test_a_frame_round_trips() -> None:
    header = {"kind": "ok", "status": 200, "headers": [["content-type", "text/plain"]]}
    data = _frames.encode(header, b"body")
    hlen, blen = _frames.PREFIX.unpack_from(data)
    assert _frames.decode_header(data[8 : 8 + hlen]) == header
    assert data[8 + hlen :] == b"body" and blen == 4


def test_too_deep_is_a_value_error_both_ways() -> None:
    deep: list[Any] = []
    for _ in range(5_000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        _frames.dumps(deep)
    assert _frames.dumps([[1]]) == "[[1]]"  # nothing left behind
    with pytest.raises(ValueError, match="nested too deeply"):
        _frames.loads(b"[" * 5_000 + b"]" * 5_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        _frames.loads("[" * 5_000 + "]" * 5_000)
