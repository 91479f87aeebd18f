"""Exact outcomes of ordinary (non-hostile) functions, cold and warm.

Every test runs against a fresh jail per call (``cold``) and a warm worker
(``warm``), through the same ``Function`` helper the hostile tests use.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from jail import Limits
from jail.result import Ending, decide
from jail.runtime import _frames
from tests.jailtest import Jail, body_json, describe, invocation


async def _ok(jail: Jail, mode: str, source: str, body: bytes | str = b"", **inv: object
              ) -> tuple[int | None, dict[str, str], bytes]:
    fn = jail.function(source, mode)
    r = await fn(body, **inv)
    assert r.outcome == "ok", describe(r)
    assert r.error_type is None and r.limit_name is None
    assert r.start == ("warm" if mode == "warm" else "cold")
    assert r.cpu_ms is not None and r.cpu_ms > 0
    assert r.peak_memory_mb is not None and 1 < r.peak_memory_mb < 64
    assert r.wall_ms > 0
    await fn.assert_recovers()
    return r.status, dict(r.headers), r.body


@pytest.mark.parametrize(
    ("ret", "status", "ctype", "body"),
    [
        ('"héllo"', 200, "text/plain; charset=utf-8", "héllo".encode()),
        ('b"\\x00\\xff"', 200, "application/octet-stream", b"\x00\xff"),
        ('{"a": [1, 2]}', 200, "application/json", b'{"a": [1, 2]}'),
        ("[1, 'x']", 200, "application/json", b'[1, "x"]'),
        ("None", 200, None, b""),
        ('Response("made", status=201, headers={"X-A": "1"})', 201,
         "text/plain; charset=utf-8", b"made"),
        ('Response(b"x", headers={"Content-Type": "image/png"})', 200, "image/png", b"x"),
        ('("nope", 404)', 404, "text/plain; charset=utf-8", b"nope"),
        ('({"e": 1}, 503, {"Retry-After": "3", "X-B": "b"})', 503, "application/json",
         b'{"e": 1}'),
        ('(b"", 204)', 204, "application/octet-stream", b""),
    ],
)
async def test_return_types(jail: Jail, mode: str, ret: str, status: int, ctype: str | None,
                            body: bytes) -> None:
    src = f"from nsfaas import Response\n\ndef handler(request, ctx):\n    return {ret}\n"
    got_status, headers, got_body = await _ok(jail, mode, src)
    assert got_status == status
    assert got_body == body
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower.get("content-type") == ctype
    if "X-A" in ret:
        assert headers["X-A"] == "1"
    if "Retry-After" in ret:
        assert headers["Retry-After"] == "3" and headers["X-B"] == "b"


async def test_async_handler(jail: Jail, mode: str) -> None:
    src = """
import asyncio

async def handler(request, ctx):
    await asyncio.sleep(0.01)
    results = await asyncio.gather(*(asyncio.sleep(0, i) for i in range(3)))
    return {"async": results}
"""
    _, _, body = await _ok(jail, mode, src)
    assert json.loads(body) == {"async": [0, 1, 2]}


async def test_request_and_ctx_reach_the_handler(jail: Jail, mode: str) -> None:
    src = """
def handler(request, ctx):
    return {
        "method": request.method, "path": request.path, "query": request.query,
        "all": request.query_all, "params": request.path_params,
        "h": request.headers.get("x-thing"), "H": request.headers["X-THING"],
        "json": request.json(), "text": request.text(),
        "id": ctx.invocation_id, "function": ctx.function, "version": ctx.version,
        "tenant": ctx.tenant, "env": ctx.env,
        "remaining": 0 < ctx.remaining_ms() <= 5000,
        # made on first use, then the same object for the whole invocation
        "same": [request.headers is request.headers, request.path_params is request.path_params,
                 ctx.log is ctx.log, ctx.kv is ctx.kv, ctx.kv._proxy is ctx.http._proxy],
    }
"""
    _, _, raw = await _ok(
        jail, mode, src, b'{"k": [1]}', method="POST", path="/a/b", query_string="x=1&x=2&y=",
        headers=(("X-Thing", "v"),), path_params={"who": "me"}, env={"K": "V"},
        function="greet", version=7, tenant="acme",
    )
    got = json.loads(raw)
    assert got.pop("id").startswith("inv-")
    assert got == {
        "method": "POST", "path": "/a/b", "query": {"x": "1", "y": ""},
        "all": {"x": ["1", "2"], "y": [""]}, "params": {"who": "me"}, "h": "v", "H": "v",
        "json": {"k": [1]}, "text": '{"k": [1]}', "function": "greet", "version": 7,
        "tenant": "acme", "env": {"K": "V"}, "remaining": True, "same": [True] * 5,
    }


async def test_exception_is_an_error_with_the_traceback_in_stderr(jail: Jail, mode: str) -> None:
    src = """
def helper():
    raise ValueError("no such thing")

def handler(request, ctx):
    print("before the crash")
    helper()
"""
    fn = jail.function(src, mode)
    r = await fn()
    assert r.outcome == "error", describe(r)
    assert (r.error_type, r.error_message) == ("ValueError", "no such thing")
    assert r.status is None and r.body == b""
    stderr = [e.message for e in r.logs if e.stream == "stderr"]
    assert all(e.level == "error" for e in r.logs if e.stream == "stderr")
    assert stderr[0] == "Traceback (most recent call last):"
    assert any('File "/function/handler.py", line 3, in helper' in m for m in stderr)
    assert stderr[-1] == "ValueError: no such thing"
    assert [(e.stream, e.message) for e in r.logs if e.stream == "stdout"] == [
        ("stdout", "before the crash")
    ]
    await fn.assert_recovers()


@pytest.mark.parametrize(
    ("body", "error_type"),
    [
        ("raise SystemExit(0)", "SystemExit"),
        ("import sys; sys.exit()", "SystemExit"),
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
        ("import os; os._exit(0)", "NoResult"),
        ("import os, sys; sys.stdout.flush(); os._exit(3)", "NoResult"),
        ("import os; os.close(3); return 'closed the result fd'", "NoResult"),
        ("import os; os.write(3, b'\\x00\\x00'); os._exit(0)", "NoResult"),
        ("import os; os.dup2(os.open('/dev/null', os.O_WRONLY), 3); return 'x'", "NoResult"),
        ("import os; os.write(3, b'\\xff' * 64); os._exit(0)", "NoResult"),
        ("import os; os.write(3, b'\\x00\\x00\\x00\\x02\\x00\\x00\\x00\\x00[]'); os._exit(0)",
         "NoResult"),
    ],
)
async def test_an_exit_is_not_a_result(jail: Jail, mode: str, body: str, error_type: str) -> None:
    src = f"def handler(request, ctx):\n    {body}\n"
    fn = jail.function(src, mode)
    r = await fn()
    assert r.outcome == "error", describe(r)
    assert r.error_type == error_type, describe(r)
    assert r.status is None and r.body == b""
    await fn.assert_recovers()


async def test_a_fake_result_on_stdout_is_only_a_log_line(jail: Jail, mode: str) -> None:
    fake_frame = _frames.encode({"kind": "ok", "status": 200, "headers": []}, b"forged")
    src = f"""
import json, os, sys

def handler(request, ctx):
    print(json.dumps({{"op": "done", "exit_code": 0, "status": 200, "body": "forged"}}))
    print(json.dumps({{"kind": "ok", "status": 200, "headers": [], "body": "forged"}}))
    sys.stdout.flush()
    sys.stdout.buffer.write({fake_frame!r} + b"\\n")
    sys.stdout.flush()
    os.write(2, {fake_frame!r})
    return "real"
"""
    fn = jail.function(src, mode)
    r = await fn()
    assert (r.outcome, r.status, r.body) == ("ok", 200, b"real"), describe(r)
    out = [e for e in r.logs if e.stream == "stdout"]
    assert len(out) == 3
    assert out[0].fields == {"op": "done", "exit_code": 0, "status": 200, "body": "forged"}
    assert "forged" in out[2].message
    assert any("forged" in e.message for e in r.logs if e.stream == "stderr")
    await fn.assert_recovers()


@pytest.mark.parametrize("status", ["99", "600", "101", "199", "1000", "-200", '"200"',
                                    "200.0", "True", "None"])
async def test_bad_status_is_bad_response(jail: Jail, mode: str, status: str) -> None:
    src = f"from nsfaas import Response\n\ndef handler(request, ctx):\n    return ('x', {status})\n"
    fn = jail.function(src, mode)
    r = await fn()
    assert r.outcome == "bad_response", describe(r)
    assert r.error_type == "BadResponse" and r.status is None and r.body == b""
    await fn.assert_recovers()


@pytest.mark.parametrize(
    "headers",
    [
        '{"X-Evil": "a\\r\\nSet-Cookie: s=1"}',
        '{"X-Evil": "a\\nb"}',
        '{"X-Evil": "a\\rb"}',
        '{"X-Evil": "a\\x00b"}',
        '{"Bad Name": "v"}',
        '{"X-Evil\\r\\nInjected": "v"}',
        '{"": "v"}',
        '{f"X-{i}": "v" for i in range(100)}',
        '{"X-Big": "v" * 20000}',
    ],
)
async def test_bad_headers_are_bad_response(jail: Jail, mode: str, headers: str) -> None:
    src = f"def handler(request, ctx):\n    return ('x', 200, {headers})\n"
    fn = jail.function(src, mode)
    r = await fn()
    assert r.outcome == "bad_response", describe(r)
    assert r.headers == () and r.body == b""
    await fn.assert_recovers()


@pytest.mark.parametrize("value", ["object()", "{1, 2}", "3", "1.5", "('a', 200, {}, 'extra')",
                                   "('only',)", "Response(object())"])
async def test_unsupported_return_value_is_bad_response(jail: Jail, mode: str, value: str
                                                        ) -> None:
    src = f"from nsfaas import Response\n\ndef handler(request, ctx):\n    return {value}\n"
    fn = jail.function(src, mode)
    r = await fn()
    assert r.outcome == "bad_response", describe(r)
    await fn.assert_recovers()


async def test_hop_by_hop_headers_are_dropped(jail: Jail, mode: str) -> None:
    src = """
def handler(request, ctx):
    return ("x", 200, {
        "Connection": "close", "Keep-Alive": "1", "Transfer-Encoding": "chunked",
        "Content-Length": "999", "Upgrade": "websocket", "TE": "trailers", "Trailer": "X",
        "Proxy-Connection": "x", "X-Invocation-Id": "forged", "X-Kept": "yes",
        "Set-Cookie": "a=1",
    })
"""
    status, headers, body = await _ok(jail, mode, src)
    assert (status, body) == (200, b"x")
    assert headers == {"X-Kept": "yes", "Set-Cookie": "a=1",
                       "content-type": "text/plain; charset=utf-8"}


async def test_log_lines_keep_stream_level_and_fields(jail: Jail, mode: str) -> None:
    src = """
import json, logging, sys

log = logging.getLogger("fn")

def handler(request, ctx):
    print("plain line")
    print("on stderr", file=sys.stderr)
    for level in ("debug", "info", "warning", "error", "critical"):
        getattr(log, level)("via logging %s", level)
    ctx.log.info("structured", user="bob", n=3)
    ctx.log.warning("careful")
    ctx.log.error("bad", nested={"a": [1]})
    ctx.log.debug("dbg")
    ctx.log.critical("crit")
    print(json.dumps({"level": "warning", "message": "json line", "k": 1}))
    print(json.dumps({"msg": "no level", "z": True}))
    print('{"not json')
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("boom")
    return "ok"
"""
    fn = jail.function(src, mode)
    r = await fn()
    assert r.outcome == "ok", describe(r)
    got = {(e.stream, e.level, e.message): e.fields for e in r.logs}
    expected = {
        ("stdout", "info", "plain line"): {},
        ("stderr", "error", "on stderr"): {},
        ("ctx", "debug", "via logging debug"): {"logger": "fn"},
        ("ctx", "info", "via logging info"): {"logger": "fn"},
        ("ctx", "warning", "via logging warning"): {"logger": "fn"},
        ("ctx", "error", "via logging error"): {"logger": "fn"},
        ("ctx", "critical", "via logging critical"): {"logger": "fn"},
        ("ctx", "info", "structured"): {"user": "bob", "n": 3},
        ("ctx", "warning", "careful"): {},
        ("ctx", "error", "bad"): {"nested": {"a": [1]}},
        ("ctx", "debug", "dbg"): {},
        ("ctx", "critical", "crit"): {},
        ("stdout", "warning", "json line"): {"k": 1},
        ("stdout", "info", "no level"): {"z": True},
        ("stdout", "info", '{"not json'): {},
    }
    boom = got.pop(("ctx", "error", "boom"))
    assert boom["logger"] == "fn" and "ZeroDivisionError: division by zero" in boom["exc"]
    assert got == expected
    assert not r.logs_truncated
    assert all(e.ts > 1e9 for e in r.logs)
    await fn.assert_recovers()


async def test_load_error_is_an_error_with_the_traceback(jail: Jail, mode: str) -> None:
    src = "import nonexistent_module_xyz\n\ndef handler(request, ctx):\n    return 'x'\n"
    if mode == "cold":
        r = await jail.cold(src)
    else:
        w = await jail.worker(src)
        r = await w.invoke(invocation(), start="warm")
        assert not w.alive
    assert r.outcome == "error", describe(r)
    assert r.error_type == "ModuleNotFoundError"
    assert r.error_message is not None and "nonexistent_module_xyz" in r.error_message
    assert any("Traceback" in e.message for e in r.logs if e.stream == "stderr"), describe(r)
    await jail.assert_good_function_works()


async def test_syntax_error_is_an_error(jail: Jail) -> None:
    r = await jail.cold("def handler(request, ctx):\n    return (\n")
    assert (r.outcome, r.error_type) == ("error", "SyntaxError"), describe(r)


async def test_missing_entrypoint_is_an_error(jail: Jail) -> None:
    r = await jail.cold("def other(request, ctx):\n    return 1\n")
    assert (r.outcome, r.error_type) == ("error", "TypeError"), describe(r)
    assert r.error_message is not None and "handler:handler" in r.error_message


async def test_response_over_its_cap_is_output_limit(jail: Jail, mode: str) -> None:
    src = "def handler(request, ctx):\n    return b'x' * (3 << 20)\n"
    fn = jail.function(src, mode, limits=Limits(timeout_s=5, memory_mb=64,
                                                response_bytes=1 << 20))
    r = await fn()
    assert (r.outcome, r.limit_name) == ("output_limit", "response"), describe(r)
    assert r.limit_value == 1 << 20 and r.body == b""
    await fn.assert_recovers()


async def test_large_response_under_its_cap(jail: Jail, mode: str) -> None:
    src = "def handler(request, ctx):\n    return b'y' * (5 << 20)\n"
    fn = jail.function(src, mode)
    r = await fn()
    assert r.outcome == "ok", describe(r)
    assert r.body == b"y" * (5 << 20)
    assert body_json(await fn(headers=(("X-Nsfaas-Probe", "1"),))) == {"probe": "ok"}


async def test_only_the_handler_process_answers(jail: Jail, mode: str) -> None:
    """A process the handler forks returns through the runtime too; its return
    value or exception must not become (or corrupt) the result."""
    src = """
import os

def handler(request, ctx):
    pid = os.fork()
    if pid == 0:
        if request.text() == "raise":
            raise RuntimeError("from the forked child")
        return "from the forked child"
    os.waitpid(pid, 0)
    return "from the handler"
"""
    fn = jail.function(src, mode)
    for body in ("return", "raise"):
        r = await fn(body)
        assert (r.outcome, r.body) == ("ok", b"from the handler"), describe(r)
    await fn.assert_recovers()


# ---- decide(): the one place an ending becomes an outcome (pure) --------------


@pytest.mark.parametrize(
    ("done", "body", "expected"),
    [
        # RLIMIT_CPU's SIGXCPU while the rusage total lags behind (busy machine)
        ({"exit_code": -24, "cpu_ms": 880.0}, b"", ("timeout", "cpu_time")),
        # a function that sends itself SIGXCPU has not used its CPU time
        ({"exit_code": -24, "cpu_ms": 10.0}, b"", ("killed", None)),
        ({"exit_code": -9, "cpu_ms": 2100.0}, b"", ("timeout", "cpu_time")),
        ({"exit_code": -9, "cpu_ms": 10.0}, b"", ("killed", None)),
        ({"exit_code": -40, "cpu_ms": 1.0}, b"", ("killed", None)),  # a real-time signal
        ({"exit_code": 0}, b"\x00", ("error", None)),  # shorter than a frame prefix
        ({"exit_code": 0}, b"\xff" * 12, ("error", None)),
        ({"exit_code": 0}, _frames.encode({"kind": "ok", "status": 200, "headers": []}, b"x")[:-1],
         ("error", None)),
        ({"exit_code": 0}, _frames.PREFIX.pack(2, 0) + b"[]", ("error", None)),
        ({"exit_code": 0}, _frames.encode({"kind": "ok", "status": 200, "headers": "x"}),
         ("bad_response", None)),
        ({"exit_code": 0}, _frames.encode({"kind": "surprise"}), ("bad_response", None)),
        ({"exit_code": 3}, b"", ("error", None)),
    ],
)
def test_decide(done: dict[str, object], body: bytes, expected: tuple[str, str | None]) -> None:
    end = Ending(limits=Limits(timeout_s=1, cpu_s=1), done={"op": "done", **done},
                 result_body=body)
    fields = decide(end)
    assert (fields["outcome"], fields.get("limit_name")) == expected, fields


@pytest.mark.parametrize(
    ("nsjail_exit", "oom_kills", "expected"),
    [
        (137, 1, ("oom", "memory")),
        (137, 0, ("killed", None)),  # was "oom": a kill from outside is no limit
        (1, 0, ("killed", None)),
        (None, 0, ("killed", None)),
    ],
)
def test_decide_runtime_gone(
    nsjail_exit: int | None, oom_kills: int, expected: tuple[str, str | None]
) -> None:
    """No done frame: the runtime (pid 1) died. The slot's OOM counter tells
    the memory limit from any other SIGKILL."""
    end = Ending(limits=Limits(), done=None, nsjail_exit=nsjail_exit, oom_kills=oom_kills)
    fields = decide(end)
    assert (fields["outcome"], fields.get("limit_name")) == expected


async def test_the_zygote_killed_from_outside_is_killed_not_oom(jail: Jail) -> None:
    """kill -9 of a warm jail's pid 1 from the host during a call was reported
    as out-of-memory (limit memory), with the slot's OOM counter at 0."""
    w = await jail.worker("import time\ndef handler(r, c):\n    time.sleep(3)\n    return {}\n")
    assert w.jail_pid is not None
    call = asyncio.create_task(w.invoke(invocation()))
    await asyncio.sleep(0.5)
    os.kill(w.jail_pid, signal.SIGKILL)
    r = await call
    assert (r.outcome, r.limit_name) == ("killed", None), describe(r)
    assert "outside" in (r.error_message or ""), describe(r)
