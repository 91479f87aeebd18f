"""JSON nested past Python's recursion limit, sent by a function through the
channels the gateway parses (stdout lines, ctx.log lines, the result frame; the
proxy's in tests/gateway/test_proxy.py): bad input like any other, never a
RecursionError in the gateway. json.loads raises RecursionError, not
ValueError, for a few KB of brackets."""

from __future__ import annotations

from jail import Limits
from tests.jailtest import Jail, describe

LIM = Limits(timeout_s=5, memory_mb=64, pids=16)
DEPTH = 2_000  # 10 KB as '{"a":' * DEPTH: under a log line's 16 KiB, far over the limit


async def test_deeply_nested_json_in_log_lines(jail: Jail, mode: str) -> None:
    src = f"""
import os

OBJ = '{{"a":' * {DEPTH} + '1' + '}}' * {DEPTH}

def handler(request, ctx):
    print(OBJ)                                   # a stdout line that looks like JSON
    os.write(4, (OBJ + "\\n").encode())         # a raw ctx.log line
    return "still here"
"""
    fn = jail.function(src, mode, limits=LIM)
    r = await fn()
    assert (r.outcome, r.body) == ("ok", b"still here"), describe(r)
    deep = '{"a":' * DEPTH + "1" + "}" * DEPTH
    # Kept whole, as plain text: not JSON the gateway could take fields from.
    # (Two pipes: their lines arrive in either order.)
    assert sorted((e.stream, e.message, e.fields == {}) for e in r.logs) == [
        ("ctx", deep, True), ("stdout", deep, True)
    ], describe(r)
    await fn.assert_recovers()


async def test_a_deeply_nested_result_header_is_an_error(jail: Jail, mode: str) -> None:
    src = f"""
import os, struct

def handler(request, ctx):
    head = b"[" * {DEPTH} + b"]" * {DEPTH}
    os.write(3, struct.pack(">II", len(head), 0) + head)
    os._exit(0)
"""
    fn = jail.function(src, mode, limits=LIM)
    r = await fn()
    assert (r.outcome, r.error_type) == ("error", "NoResult"), describe(r)
    assert "nested too deeply" in (r.error_message or ""), describe(r)
    await fn.assert_recovers()


async def test_a_deeply_nested_return_value_is_a_bad_response(jail: Jail, mode: str) -> None:
    src = f"""
def handler(request, ctx):
    deep = []
    for _ in range({DEPTH}):
        deep = [deep]
    return {{"deep": deep}}
"""
    fn = jail.function(src, mode, limits=LIM)
    r = await fn()
    assert (r.outcome, r.error_type) == ("bad_response", "BadResponse"), describe(r)
    assert "nested too deeply" in (r.error_message or ""), describe(r)
    await fn.assert_recovers()
