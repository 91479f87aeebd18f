"""Exceptions that are hard to report: each is an `error` named after its type,
never an output_limit for the runtime's own traceback or a NoResult because the
message could not be made."""

from __future__ import annotations

from jail import Limits
from tests.jailtest import Jail, describe

LIM = Limits(timeout_s=5, memory_mb=128, pids=16)


async def test_a_huge_exception_message_is_an_error(jail: Jail, mode: str) -> None:
    src = "def handler(request, ctx):\n    raise ValueError('x' * 5_000_000)\n"
    fn = jail.function(src, mode, limits=LIM)
    r = await fn()
    assert (r.outcome, r.error_type) == ("error", "ValueError"), describe(r)
    assert len(r.error_message or "") <= 2000
    text = "\n".join(e.message for e in r.logs)
    assert "characters cut" in text and "Traceback" in text, describe(r)
    assert sum(len(e.message) for e in r.logs) < 64 * 1024
    await fn.assert_recovers()


async def test_an_exception_whose_str_fails_is_an_error(jail: Jail, mode: str) -> None:
    src = """
class Weird(Exception):
    def __str__(self):
        raise RuntimeError("no")

def handler(request, ctx):
    raise Weird()
"""
    fn = jail.function(src, mode, limits=LIM)
    r = await fn()
    assert (r.outcome, r.error_type) == ("error", "Weird"), describe(r)
    assert r.error_message == "<Weird: str() failed>", describe(r)
    assert not any('"kind"' in e.message for e in r.logs), describe(r)  # no runtime internals
    await fn.assert_recovers()
