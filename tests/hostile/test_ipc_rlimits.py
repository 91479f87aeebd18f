"""IPC that could outlive a warm invocation, and the rlimits that forbid it."""

from __future__ import annotations

from tests.jailtest import Jail, body_json, describe

MQ = """
import ctypes, os

def handler(request, ctx):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.mq_open(b"/nsfaas-leak", os.O_CREAT | os.O_RDWR, 0o600, None)
    return {"fd": fd, "errno": ctypes.get_errno()}
"""

RLIMITS = """
import resource

def handler(request, ctx):
    names = ["RLIMIT_MSGQUEUE", "RLIMIT_MEMLOCK", "RLIMIT_RTPRIO", "RLIMIT_STACK", "RLIMIT_CORE"]
    return {n: list(resource.getrlimit(getattr(resource, n))) for n in names}
"""

MLOCK = """
import ctypes

def handler(request, ctx):
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(1 << 20)
    rc = libc.mlock(buf, len(buf))
    return {"rc": rc, "errno": ctypes.get_errno()}
"""


async def test_posix_message_queues_cannot_be_created(jail: Jail, mode: str) -> None:
    fn = jail.function(MQ, mode)
    r = await fn()
    assert r.outcome == "ok", describe(r)
    assert body_json(r) == {"fd": -1, "errno": 24}, describe(r)  # EMFILE: RLIMIT_MSGQUEUE is 0
    await fn.assert_recovers()


async def test_rlimits_are_the_policy_values(jail: Jail, mode: str) -> None:
    fn = jail.function(RLIMITS, mode)
    r = await fn()
    assert body_json(r) == {
        "RLIMIT_MSGQUEUE": [0, 0],
        "RLIMIT_MEMLOCK": [0, 0],
        "RLIMIT_RTPRIO": [0, 0],
        "RLIMIT_STACK": [8 << 20, 8 << 20],
        "RLIMIT_CORE": [0, 0],
    }, describe(r)


async def test_mlock_is_refused(jail: Jail, mode: str) -> None:
    fn = jail.function(MLOCK, mode)
    r = await fn()
    assert body_json(r)["rc"] == -1 and body_json(r)["errno"] in (1, 11, 12), describe(r)
    await fn.assert_recovers()
