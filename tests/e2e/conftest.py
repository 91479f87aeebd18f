"""End-to-end fixtures: a real uvicorn on loopback, real jails, real HTTP.

Two ways to run the gateway:

* ``live`` / ``start_live``: ``uvicorn.Server`` serving ``create_app(settings)`` as a
  task of the test's own event loop (port 0, so no port races), lifespan on.
* ``GatewayProcess``: ``python -m gateway.cli serve`` as a real subprocess configured
  through ``NSFAAS_*`` variables, for the tests that kill or signal the gateway.

Data dirs are short paths under /tmp (pytest's tmp_path is long and 0700) and are
removed afterwards, together with the jail dir the gateway chose for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.app import create_app
from gateway.config import Settings
from gateway.httpproto import header_limited_protocol
from jail import choose_jail_dir
from jail.cgroups import is_jail_uid

ADMIN = "e2e-admin-key"
CGROUP_V1 = Path("/sys/fs/cgroup")
CGROUP_PARENT = "nsfaas"
CONTROLLERS = ("memory", "pids", "cpu")
REPO = Path(__file__).resolve().parents[2]


def auth(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def short_tmp(prefix: str = "nse-") -> Path:
    """A short, fresh directory under /tmp (mode 0700, as a user's data dir would be)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def remove_data_dir(data_dir: Path) -> None:
    jail_dir = choose_jail_dir(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(jail_dir, ignore_errors=True)


def e2e_settings(data_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "admin_key": ADMIN,
        "default_timeout_s": 10.0,
        "warm_idle_s": 60.0,
    }
    base.update(overrides)
    return Settings(**base)


@dataclass
class Live:
    """A running gateway: where it is and how to talk to it."""

    url: str
    key: str
    settings: Settings
    app: Any = None  # the Starlette app (in-process servers only)

    def client(self, **kw: Any) -> httpx.AsyncClient:
        kw.setdefault("timeout", 60.0)
        return httpx.AsyncClient(base_url=self.url, **kw)

    @property
    def auth(self) -> dict[str, str]:
        return auth(self.key)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def deploy(
        self, client: httpx.AsyncClient, name: str, source: str, **opts: Any
    ) -> httpx.Response:
        r = await client.put(
            f"/api/v1/functions/{name}", json={"source": source, **opts}, headers=self.auth
        )
        assert r.status_code in (200, 201), r.text
        return r


StartLive = Callable[..., contextlib.AbstractAsyncContextManager[Live]]


@contextlib.asynccontextmanager
async def serving(head_timeout_s: float = 10.0, **overrides: Any) -> AsyncIterator[Live]:
    """``serve_in_loop`` on a fresh data dir (``e2e_settings`` with ``overrides``),
    removed afterwards."""
    data_dir = short_tmp()
    try:
        async with serve_in_loop(e2e_settings(data_dir, **overrides), head_timeout_s) as live:
            yield live
    finally:
        remove_data_dir(data_dir)


@contextlib.asynccontextmanager
async def serving_one(name: str, source: str, **overrides: Any) -> AsyncIterator[Live]:
    """``serving`` with one public function deployed."""
    async with serving(**overrides) as live:
        async with live.client() as c:
            await live.deploy(c, name, source, public=True)
        yield live


async def raw_exchange(live: Live, data: bytes) -> bytes:
    """Send ``data`` over a raw connection (while reading: a refused sender is
    not read to the end), then everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for i in range(0, len(data), 1 << 16):
                writer.write(data[i : i + (1 << 16)])
                await writer.drain()

    sender = asyncio.create_task(send())
    out = b""
    try:
        async with asyncio.timeout(20):
            while chunk := await reader.read(1 << 16):
                out += chunk
    except ConnectionResetError:
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return out


@contextlib.asynccontextmanager
async def serve_in_loop(settings: Settings, head_timeout_s: float = 10.0) -> AsyncIterator[Live]:
    """uvicorn in this event loop, with the HTTP protocol `nsfaas serve` uses;
    yields once it accepts connections."""
    app = create_app(settings)
    config = uvicorn.Config(
        app=app,
        host="127.0.0.1",
        port=0,
        http=header_limited_protocol(settings.max_header_bytes, head_timeout_s),
        log_config=None,
        lifespan="on",
        access_log=False,
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn's answer to a failed lifespan start-up
            raise RuntimeError(f"uvicorn failed to start (exit {exc.code})") from None

    task = asyncio.create_task(run())
    try:
        async with asyncio.timeout(60):
            while not server.started:
                if task.done():
                    task.result()  # raises the start-up failure
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Live(f"http://127.0.0.1:{port}", ADMIN, settings, app)
    finally:
        server.should_exit = True
        async with asyncio.timeout(60):
            await task


@pytest.fixture
async def start_live() -> AsyncIterator[StartLive]:
    """``async with start_live(**setting_overrides) as live:`` (several per test allowed)."""
    made: list[Path] = []

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Live]:
        data_dir = short_tmp()
        made.append(data_dir)
        async with serve_in_loop(e2e_settings(data_dir, **overrides)) as live:
            yield live

    try:
        yield start
    finally:
        for d in made:
            remove_data_dir(d)


@pytest.fixture
async def live(start_live: StartLive) -> AsyncIterator[Live]:
    """A gateway with default settings (warm on)."""
    async with start_live() as lv:
        yield lv


# -- the gateway as a subprocess ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """``python -m gateway.cli serve`` in its own session, configured by NSFAAS_* env."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = ADMIN
        self.extra_env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._log: Any = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout_s: float = 60.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NSFAAS_")}
        env.update(
            NSFAAS_DATA_DIR=str(self.data_dir),
            NSFAAS_HOST="127.0.0.1",
            NSFAAS_PORT=str(self.port),
            NSFAAS_ADMIN_KEY=self.key,
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        self._log = self._open_log()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            cwd=str(REPO),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as c:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"gateway exited early:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    r = await c.get("/healthz")
                    if r.status_code == 200:
                        return
                if loop.time() > deadline:
                    raise RuntimeError(f"gateway did not become healthy:\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    def _open_log(self) -> Any:
        return open(self.log_path, "ab")  # closed in wait()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    async def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        try:
            async with asyncio.timeout(timeout_s):
                code = await self.proc.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return code

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go in time (tear-down only)."""
        if self.proc is None or self.proc.returncode is not None:
            if self._log is not None:
                await self.wait()
            return
        self.signal(signal.SIGTERM)
        try:
            await self.wait(30.0)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.wait()


@pytest.fixture
async def gateway_procs() -> AsyncIterator[Callable[..., GatewayProcess]]:
    """``make(data_dir, **env)``: subprocess gateways, all stopped at tear-down."""
    procs: list[GatewayProcess] = []
    dirs: set[Path] = set()

    def make(data_dir: Path, **env: str) -> GatewayProcess:
        gp = GatewayProcess(data_dir, **env)
        procs.append(gp)
        dirs.add(data_dir)
        return gp

    try:
        yield make
    finally:
        for gp in procs:
            await gp.stop()
        for d in dirs:
            remove_data_dir(d)
            with contextlib.suppress(OSError):
                (d.parent / f"{d.name}.log").unlink()


# -- host inspection ------------------------------------------------------------------


def _status(pid: int | str) -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def start_time(pid: int) -> int | None:
    """A process's start time in clock ticks (pairs with the pid against reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def descendants(root: int) -> dict[int, int | None]:
    """pid -> start time of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _status(entry).get("PPid")
            if ppid and ppid.isdigit():
                children.setdefault(int(ppid), []).append(int(entry))
    out: dict[int, int | None] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = start_time(pid)
        todo += children.get(pid, [])
    return out


def orphaned_jail_processes(owner: int) -> dict[int, str]:
    """Processes of the jail uid that belong to ``owner`` or to nobody.

    A jail-uid process counts when its nearest nsjail ancestor was started by
    ``owner``, when that nsjail has been orphaned (parent pid 1), or when it has
    no nsjail ancestor at all. Jails of other live programs are left out.
    """
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        uids = _status(entry).get("Uid", "").split()
        if not uids or not is_jail_uid(int(uids[0])):
            continue
        pid, ours = entry, True
        for _ in range(64):
            ppid = _status(pid).get("PPid", "0")
            if ppid in ("0", "1", ""):
                break
            if _status(ppid).get("Name") == "nsjail":
                ours = _status(ppid).get("PPid") in (str(owner), "1", "0", "")
                break
            pid = ppid
        if ours:
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                found[int(entry)] = cmd.decode(errors="replace").strip()
    return found


def jail_cgroups(prefixes: tuple[str, ...] = ("NSJAIL.", "slot-")) -> set[Path]:
    """Per-jail cgroups under our v1 parent, all controllers: nsjail's own
    ``NSJAIL.<pid>`` and the gateway's reusable ``slot-<gateway pid>-...``."""
    found: set[Path] = set()
    for c in CONTROLLERS:
        parent = CGROUP_V1 / c / CGROUP_PARENT
        with contextlib.suppress(OSError):
            found |= {d for d in parent.iterdir() if d.is_dir() and d.name.startswith(prefixes)}
    return found


def gateway_cgroups(gateway_pid: int) -> set[Path]:
    """The slot cgroups a gateway process created (named after its pid)."""
    return jail_cgroups((f"slot-{gateway_pid}-",))


class ProcessWatch:
    """Samples the descendants of a process in a thread until stopped."""

    def __init__(self, root: int, period_s: float = 0.01) -> None:
        self.root = root
        self.period_s = period_s
        self.seen: dict[int, int | None] = {}
        self._stop = False
        self._task: asyncio.Future[None] | None = None

    def _run(self) -> None:
        import time

        while not self._stop:
            self.seen.update(descendants(self.root))
            time.sleep(self.period_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().run_in_executor(None, self._run)

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            await self._task

    def survivors(self) -> dict[int, int | None]:
        """Sampled processes still alive (same pid and start time)."""
        return {
            pid: st for pid, st in self.seen.items() if st is not None and start_time(pid) == st
        }


@pytest.fixture
def cgroups_before() -> Iterator[set[Path]]:
    yield jail_cgroups()


async def wait_for(check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 5.0) -> bool:
    """Poll ``check`` until true or the timeout passes; the last answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        ok = check()
        if not isinstance(ok, bool):
            ok = await ok
        if ok or loop.time() > deadline:
            return ok
        await asyncio.sleep(0.05)


__all__ = [
    "ADMIN",
    "GatewayProcess",
    "Live",
    "ProcessWatch",
    "StartLive",
    "auth",
    "descendants",
    "e2e_settings",
    "gateway_cgroups",
    "jail_cgroups",
    "orphaned_jail_processes",
    "short_tmp",
    "start_time",
    "wait_for",
]
