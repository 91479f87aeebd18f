"""Return values at the edges of the response contract: each is a bad_response
(naming why), never a body that is not what it claims (NaN is not JSON), a
header the function did not write (b'x-a'), or an error blamed on the runtime."""

from __future__ import annotations

import pytest

from jail import Limits
from tests.jailtest import Jail, describe

LIM = Limits(timeout_s=5, memory_mb=64, pids=16)

BAD = {
    "nan": ("return {'a': float('nan')}", "Out of range float"),
    "infinity": ("return [1, float('inf')]", "Out of range float"),
    "bytes_header_name": ("return ('x', 200, {b'X-A': 'b'})", "header names must be str"),
    "bytes_header_value": ("return ('x', 200, {'X-A': b'b'})", "header values must be str"),
    "nan_header_value": ("return ('x', 200, {'X-B': float('nan')})", "header values must be"),
    "65_headers": ("return ('x', 200, {f'X-{i}': 'v' for i in range(65)})", "at most 64"),
    "raising_items": (
        "class D(dict):\n        def items(self):\n            raise KeyError('boom')\n"
        "    return D(a='b')",
        "KeyError",
    ),
    "raising_encode": (
        "class S(str):\n        def encode(self, *a):\n            raise LookupError('no')\n"
        "    return S('x')",
        "LookupError: no",
    ),
    "lone_surrogate_text": ("return 'a\\ud800'", "surrogate"),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_a_return_value_outside_the_contract_is_a_bad_response(
    jail: Jail, mode: str, case: str
) -> None:
    body, why = BAD[case]
    fn = jail.function(f"def handler(request, ctx):\n    {body}\n", mode, limits=LIM)
    r = await fn()
    assert (r.outcome, r.error_type) == ("bad_response", "BadResponse"), describe(r)
    assert why in (r.error_message or ""), describe(r)
    await fn.assert_recovers()


async def test_exactly_64_headers_and_numbers_as_values(jail: Jail, mode: str) -> None:
    src = (
        "def handler(request, ctx):\n"
        "    headers = {f'X-{i}': 'v' for i in range(63)}\n"
        "    headers['X-Count'] = 3\n"
        "    return {'ok': 1.5}, 201, headers\n"
    )
    fn = jail.function(src, mode, limits=LIM)
    r = await fn()
    assert (r.outcome, r.status, r.body) == ("ok", 201, b'{"ok": 1.5}'), describe(r)
    assert len(r.headers) == 65 and ("X-Count", "3") in r.headers, r.headers
    await fn.assert_recovers()


async def test_repeated_headers_as_pairs_and_the_gateways_own_dropped(
    jail: Jail, mode: str
) -> None:
    src = (
        "def handler(request, ctx):\n"
        "    return 'x', 200, [('Set-Cookie', 'a=1'), ('Set-Cookie', 'b=2'),\n"
        "                      ('Server', 'evil'), ('Date', 'yesterday'),\n"
        "                      ('X-Request-Id', 'forged'), ('X-Ok', 'yes')]\n"
    )
    fn = jail.function(src, mode, limits=LIM)
    r = await fn()
    assert r.outcome == "ok", describe(r)
    assert [h for h in r.headers if h[0] != "content-type"] == [
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Ok", "yes"),
    ], r.headers
    await fn.assert_recovers()
