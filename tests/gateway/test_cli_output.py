"""What a function writes reaches the operator's terminal only as printable text.

``nsfaas logs`` and ``nsfaas invocations`` used to print log messages and error
messages raw, so a function could send ESC sequences, CR or NUL to whoever
read its logs. The CLI runs as a subprocess against a real gateway (uvicorn on
loopback, real jails).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import shutil
import sys
import tty
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn

from gateway.app import create_app
from gateway.cli import _safe
from gateway.httpproto import header_limited_protocol
from jail import choose_jail_dir

from .conftest import ADMIN, make_settings

REPO = Path(__file__).resolve().parents[2]
NASTY = "\x1b[31mred\x1b[0m|\r|\x00|\x07|\x08|\x7f|\x9b2J|\x85|tab\there|é 😀"
SOURCE = f"""
NASTY = {NASTY!r}

def handler(request, ctx):
    print(NASTY)
    print("two\\nlines")
    ctx.log.warning(NASTY, **{{"f": NASTY, NASTY: 1}})
    if request.query.get("fail"):
        raise ValueError(NASTY)
    return NASTY
"""
# Bytes that must never reach the terminal: C0 but tab and newline, DEL, and C1
# (as UTF-8: C2 80 to C2 9F).
C0 = {b for b in range(0x20) if b not in (0x09, 0x0A)} | {0x7F}


def _assert_printable(out: bytes) -> None:
    bad = sorted({b for b in out if b in C0})
    assert not bad, (bad, out)
    text = out.decode("utf-8")  # lone surrogates could not even be encoded
    assert not [c for c in text if 0x80 <= ord(c) < 0xA0], text


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[str]:
    settings = make_settings(tmp_path / "data")
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=0,
        http=header_limited_protocol(settings.max_header_bytes),
        log_config=None,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(60):
            while not server.started:
                assert not task.done()
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        shutil.rmtree(choose_jail_dir(settings.data_dir), ignore_errors=True)


async def _cli(url: str, *args: str, stdout: int = asyncio.subprocess.PIPE) -> tuple[int, bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSFAAS_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "--url",
        url,
        "--key",
        ADMIN,
        *args,
        cwd=str(REPO),
        env=env,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    _assert_printable(err)
    assert proc.returncode is not None
    return proc.returncode, out or b""


async def test_cli_escapes_control_characters_from_functions(live: str, tmp_path: Path) -> None:
    fn = tmp_path / "nasty.py"
    fn.write_text(SOURCE)
    code, out = await _cli(live, "deploy", "nasty", str(fn), "--public")
    assert code == 0, out
    assert (await _cli(live, "invoke", "nasty", "-X", "GET"))[0] == 0
    assert (await _cli(live, "invoke", "nasty", "-X", "GET", "--path", "?fail=1"))[0] == 1

    code, out = await _cli(live, "logs", "nasty")
    assert code == 0
    _assert_printable(out)
    text = out.decode()
    shown = _safe(NASTY)
    assert shown.startswith("\\x1b[31mred\\x1b[0m|\\x0d|\\x00|\\x07|\\x08|\\x7f|\\u009b2J|")
    assert shown.endswith("|tab\there|é 😀")  # tab and printable unicode as they were
    assert f" {shown}" in text, text  # the message
    # Fields print as JSON (which escapes C0 itself), the rest escaped on top.
    assert '"f": ' + _safe(json.dumps(NASTY, ensure_ascii=False)) in text, text

    code, out = await _cli(live, "invocations", "nasty")
    assert code == 0
    _assert_printable(out)
    assert shown in out.decode(), out  # the error message

    # --json is JSON, which escapes them itself.
    for cmd in ("logs", "invocations"):
        code, out = await _cli(live, cmd, "nasty", "--json")
        assert code == 0
        _assert_printable(out)


async def test_invoke_escapes_the_body_on_a_terminal_only(live: str, tmp_path: Path) -> None:
    fn = tmp_path / "nasty.py"
    fn.write_text(SOURCE)
    assert (await _cli(live, "deploy", "nasty", str(fn), "--public"))[0] == 0

    code, out = await _cli(live, "invoke", "nasty", "-X", "GET")
    assert (code, out) == (0, NASTY.encode() + b"\n")  # piped: the data as it is

    main, sub = pty.openpty()
    tty.setraw(sub)  # no CR added to LF: every byte read is the CLI's
    try:
        code, _ = await _cli(live, "invoke", "nasty", "-X", "GET", stdout=sub)
        os.close(sub)
        got = b""
        with contextlib.suppress(OSError):  # EIO: the terminal's last writer is gone
            while chunk := os.read(main, 65536):
                got += chunk
    finally:
        os.close(main)
        with contextlib.suppress(OSError):
            os.close(sub)
    assert code == 0
    _assert_printable(got)
    assert got.decode() == _safe(NASTY) + "\n"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[2J", "\\x1b[2J"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("\x00\x7f", "\\x00\\x7f"),
        ("\x9b\x80\x9f", "\\u009b\\u0080\\u009f"),
        ("\ud800x\udfff", "\\ud800x\\udfff"),
        ("\t é ü 中 😀 \xa0", "\t é ü 中 😀 \xa0"),
    ],
)
def test_safe_escapes_only_control_characters(raw: str, shown: str) -> None:
    assert _safe(raw) == shown
