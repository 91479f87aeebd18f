"""What a function sees of the runtime, the same warm and cold: its prints kept
whatever ends the call, no runtime arguments, no runtime log lines."""

from __future__ import annotations

import pytest

from jail import Limits
from tests.jailtest import Jail, describe

PRINTS = """
import asyncio, os, sys, time

def handler(request, ctx):
    how = request.text()
    print("before", how)
    if how == "timeout":
        time.sleep(5)
    if how == "exit":
        os._exit(1)
    if how == "oom":
        hog = []
        while True:
            hog.append(bytearray(1 << 20))
    return {"argv": sys.argv}
"""


@pytest.mark.parametrize("how", ["timeout", "exit", "oom"])
async def test_what_a_call_printed_is_kept_whatever_ends_it(
    jail: Jail, mode: str, how: str
) -> None:
    """stdout to a pipe was block-buffered: a print before a timeout, an OOM or
    os._exit was lost with the buffer, exactly when it was needed."""
    fn = jail.function(PRINTS, mode, limits=Limits(timeout_s=1, memory_mb=64))
    r = await fn(how)
    assert r.outcome != "ok", describe(r)
    printed = [e.message for e in r.logs if e.stream == "stdout"]
    assert printed == [f"before {how}"], describe(r)
    await fn.assert_recovers()


ASYNC = """
import sys

async def handler(request, ctx):
    return {"argv": sys.argv}
"""


async def test_no_runtime_arguments_and_no_runtime_log_lines(jail: Jail, mode: str) -> None:
    """sys.argv held the runtime's own arguments (control fd, entrypoint,
    "warm"/"once"), different warm and cold; an async handler's every call
    logged asyncio's "Using selector" debug line."""
    fn = jail.function(ASYNC, mode)
    r = await fn()
    assert r.outcome == "ok" and r.body == b'{"argv": [""]}', describe(r)
    assert [e.message for e in r.logs] == [], describe(r)
    await fn.assert_recovers()


LINES = """
def handler(request, ctx):
    for i in range(6000):
        print(i)
    return "done"
"""


async def test_the_line_cap_is_named_as_the_limit_hit(jail: Jail, mode: str) -> None:
    """6,000 short lines hit the 5,000-line cap, and the record said the byte
    cap (limit_value 1048576, "log output over its cap")."""
    lim = Limits(timeout_s=5, memory_mb=64, log_lines=5000)
    fn = jail.function(LINES, mode, limits=lim)
    r = await fn()
    assert (r.outcome, r.limit_name, r.limit_value) == ("output_limit", "output", 5000), (
        describe(r)
    )
    assert r.limit_value != lim.log_bytes
    assert "5000 log lines" in (r.error_message or ""), describe(r)
    await fn.assert_recovers()


TWO_TYPES = """
def handler(request, ctx):
    if request.text() == "two":
        return "x", 200, [("Content-Type", "text/a"), ("content-type", "text/b")]
    return "x", 200, [("X-Pad", "  spaced\\t ")]
"""


async def test_a_response_takes_one_content_type_and_values_without_outer_spaces(
    jail: Jail, mode: str
) -> None:
    """Two Content-Type headers reached the client as they were (which one it
    used was its guess), and a value's outer whitespace went on the wire."""
    fn = jail.function(TWO_TYPES, mode)
    r = await fn("two")
    assert r.outcome == "bad_response" and "given twice" in (r.error_message or ""), describe(r)
    r = await fn("pad")
    assert r.outcome == "ok" and ("X-Pad", "spaced") in r.headers, describe(r)
    await fn.assert_recovers()
