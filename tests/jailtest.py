"""Helpers for the jail tests (imported by tests/conftest.py and the test modules).

Everything here drives real nsjail, no mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jail import Invocation, JailResult, JailRunner, JailSpec, Limits, Worker
from jail.cgroups import is_jail_uid

Deploy = Callable[[str], Path]

GOOD = """\
def handler(request, ctx):
    return {"good": True, "body": request.text()}
"""

# Appended to every hostile function: the same code (and, warm, the same
# zygote) must still answer a harmless request after the hostile one.
PROBE_ENTRY = "handler:_nsfaas_test_entry"
_PROBE = """

def _nsfaas_test_entry(request, ctx):
    if request.headers.get("x-nsfaas-probe") == "1":
        return {"probe": "ok"}
    return handler(request, ctx)
"""

FAST = Limits(timeout_s=5, memory_mb=64, pids=16)

_ids = itertools.count(1)


def invocation(body: bytes | str = b"", **kw: Any) -> Invocation:
    """An Invocation with a unique id; ``kw`` sets any other field."""
    raw = body.encode() if isinstance(body, str) else body
    kw.setdefault("function", "t")
    kw.setdefault("version", 1)
    kw.setdefault("tenant", "tenant-a")
    return Invocation(invocation_id=f"inv-{os.getpid()}-{next(_ids)}", body=raw, **kw)


def describe(r: JailResult) -> str:
    """Everything useful about a result, for assertion messages."""
    logs = "\n".join(f"  [{e.stream}/{e.level}] {e.message[:300]}" for e in r.logs[-25:])
    return (
        f"outcome={r.outcome} status={r.status} error={r.error_type}: {r.error_message} "
        f"limit={r.limit_name}={r.limit_value} wall_ms={r.wall_ms:.0f} cpu_ms={r.cpu_ms} "
        f"truncated={r.logs_truncated} body={r.body[:500]!r}\n{logs}"
    )


def body_json(r: JailResult) -> Any:
    assert r.outcome == "ok", describe(r)
    return json.loads(r.body)


# ---- deploying code ----------------------------------------------------------------


def make_deploy(runner: JailRunner) -> Deploy:
    """``deploy(source) -> code_dir``: handler.py in a 0755 dir, 0644, named by
    digest, materialised the way the gateway does it (``ensure_code``, which
    also precompiles the bytecode)."""

    def _deploy(source: str) -> Path:
        text = textwrap.dedent(source)
        digest = hashlib.sha256(text.encode()).hexdigest()[:20]

        def unpack(code: Path) -> None:
            tmp = code.with_name(f".{digest}.{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            os.chmod(tmp, 0o755)  # noqa: S103 (nsjail binds it as the jail uid)
            (tmp / "handler.py").write_text(text)
            os.chmod(tmp / "handler.py", 0o644)
            tmp.rename(code)

        return runner.ensure_code(digest, unpack)

    return _deploy


# ---- running functions ------------------------------------------------------------


class Jail:
    """Runs functions in real jails and closes every worker it started."""

    def __init__(self, runner: JailRunner, deploy: Deploy) -> None:
        self.runner = runner
        self.deploy = deploy
        self.workers: list[Worker] = []

    def spec(self, source: str, limits: Limits = FAST, *, entrypoint: str = "handler:handler",
             mode: str = "once", **kw: Any) -> JailSpec:
        return self.runner.spec(self.deploy(source), entrypoint, limits, mode=mode, **kw)

    async def cold(self, source: str, body: bytes | str = b"", *, limits: Limits = FAST,
                   entrypoint: str = "handler:handler", spec_kw: dict[str, Any] | None = None,
                   **inv: Any) -> JailResult:
        spec = self.spec(source, limits, entrypoint=entrypoint, **(spec_kw or {}))
        return await self.runner.run(spec, invocation(body, **inv))

    async def worker(self, source: str, *, limits: Limits = FAST,
                     entrypoint: str = "handler:handler", **kw: Any) -> Worker:
        w = Worker(self.runner.config, self.spec(source, limits, entrypoint=entrypoint,
                                                 mode="warm", **kw))
        self.workers.append(w)
        async with asyncio.timeout(15):
            await w.start()
        return w

    def function(self, source: str, mode: str, *, limits: Limits = FAST,
                 **spec_kw: Any) -> Function:
        return Function(self, source + _PROBE, mode, limits, spec_kw)

    async def assert_good_function_works(self) -> None:
        r = await self.cold(GOOD, "still here")
        assert body_json(r) == {"good": True, "body": "still here"}, describe(r)

    async def settle(self, within_s: float = 5.0) -> None:
        """Wait for the background teardown of finished cold jails (bounded)."""
        async with asyncio.timeout(within_s):
            await self.runner.settle()

    async def aclose(self) -> None:
        for w in self.workers:
            await w.aclose(kill=True)
        await self.settle()


class Function:
    """One hostile function run the way ``mode`` says.

    ``cold``: every call is a fresh jail (``runner.run``). ``warm``: calls go
    to one warm worker; when it has died, the next call starts a fresh one
    (``restarts`` counts them), as a pool would.
    """

    def __init__(self, jail: Jail, source: str, mode: str, limits: Limits,
                 spec_kw: dict[str, Any]) -> None:
        assert mode in ("cold", "warm")
        self.jail = jail
        self.spec_kw = spec_kw
        self.source = source
        self.mode = mode
        self.limits = limits
        self.worker: Worker | None = None
        self.restarts = 0

    @property
    def alive(self) -> bool:
        return self.worker is not None and self.worker.alive

    async def __call__(self, body: bytes | str = b"", **inv: Any) -> JailResult:
        if self.mode == "cold":
            return await self.jail.cold(self.source, body, limits=self.limits,
                                        entrypoint=PROBE_ENTRY, spec_kw=self.spec_kw, **inv)
        if self.worker is None or not self.worker.alive:
            if self.worker is not None:
                self.restarts += 1
                await self.worker.aclose(kill=True)
            self.worker = await self.jail.worker(self.source, limits=self.limits,
                                                 entrypoint=PROBE_ENTRY, **self.spec_kw)
        return await self.worker.invoke(invocation(body, **inv), start="warm")

    async def assert_recovers(self) -> JailResult:
        """The same code still answers (warm: on the same worker if it lives),
        and an unrelated good function still works."""
        was_alive, restarts = self.alive, self.restarts
        r = await self(headers=(("X-Nsfaas-Probe", "1"),))
        assert body_json(r) == {"probe": "ok"}, describe(r)
        if self.mode == "warm":
            assert r.start == "warm"
            assert self.alive, "a warm worker must survive a plain invocation"
            if was_alive:
                assert self.restarts == restarts, "the probe ran on the same worker"
        await self.jail.assert_good_function_works()
        return r


# ---- host-side inspection ---------------------------------------------------------


def _status(pid: str) -> dict[str, str]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def jail_uid_processes(owner: int | None = None) -> dict[int, str]:
    """Host processes running as the jail uid that are *ours* or nobody's.

    A process counts when its nearest ``nsjail`` ancestor was started by
    ``owner`` (default: this test process), or when it has no nsjail ancestor
    at all (an escapee). Jails of other programs on the machine (other test
    sessions, a running gateway) are left out. Returns pid -> command line.
    """
    owner = os.getpid() if owner is None else owner
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _status(entry)
        uids = st.get("Uid", "").split()
        if not uids or not is_jail_uid(int(uids[0])):
            continue
        pid, ours = entry, True
        for _ in range(64):  # walk up to the nsjail that started it
            ppid = _status(pid).get("PPid", "0")
            if ppid in ("0", "1", ""):
                break  # reparented to init: an escapee
            if _status(ppid).get("Name") == "nsjail":
                ours = _status(ppid).get("PPid") == str(owner)
                break
            pid = ppid
        if ours:
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                found[int(entry)] = cmd.decode(errors="replace").strip()
    return found


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker``."""
    hits = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                    hits.append(int(entry))
    return hits


def ancestors(pid: int) -> list[int]:
    """Host pids above ``pid``, nearest first."""
    out: list[int] = []
    cur = str(pid)
    for _ in range(64):
        ppid = _status(cur).get("PPid", "0")
        if ppid in ("0", ""):
            break
        out.append(int(ppid))
        cur = ppid
    return out


async def gone(marker: str, within_s: float) -> bool:
    """Poll until no process carries ``marker`` (True) or time runs out (False)."""
    deadline = time.monotonic() + within_s
    while processes_with(marker):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True
