"""One jailed runtime process (nsjail + bootstrap) and the protocol to drive it.

A worker serves one invocation at a time. The cold path starts a worker in
``once`` mode for a single invocation; the warm path keeps ``warm`` workers
in a pool. Both use exactly this code, so every limit behaves the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any

from . import cgroups as cg
from .cgroups import SlotLimits
from .command import JailConfig, JailSpec, build_command, slot_limits
from .errors import WorkerError
from .launcher import Prepared
from .proxy import CallContext, HostProxy, ProxyHandler
from .result import Ending, JailResult, LogEntry, decide, frame_usage, log_entry
from .runtime import _frames

NSJAIL_LOG_CAP = 64 * 1024
CLOSE_GRACE_S = 1.0
CANCEL_GRACE_S = 0.5  # for the zygote to kill a timed-out child and answer


@dataclass(frozen=True, slots=True)
class Invocation:
    """What the function is asked to do: the request and its context."""

    invocation_id: str
    function: str
    version: int
    tenant: str
    method: str = "GET"
    path: str = "/"
    query_string: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    path_params: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    egress_allow: tuple[str, ...] = ()
    depth: int = 0  # nesting of ctx.invoke calls

    def frame_header(self, spec: JailSpec) -> dict[str, Any]:
        return {
            "op": "invoke",
            "request": {
                "method": self.method,
                "path": self.path,
                "query_string": self.query_string,
                "headers": [list(h) for h in self.headers],
                "path_params": dict(self.path_params),
            },
            "ctx": {
                "invocation_id": self.invocation_id,
                "function": self.function,
                "version": self.version,
                "tenant": self.tenant,
                "env": dict(self.env),
                "timeout_s": spec.limits.timeout_s,
            },
            "limits": spec.limits.for_runtime(),
        }


class _Collector:
    """Log lines of one invocation, capped by bytes and lines."""

    def __init__(self, max_bytes: int, max_lines: int) -> None:
        self.lines: list[LogEntry] = []
        self.bytes = 0
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.truncated = False

    def add(self, stream: str, line: str, ts: float | None = None) -> bool:
        """Keep the line if under the caps; False once over them."""
        if self.truncated:
            return False
        self.bytes += len(line) + 1
        if self.bytes > self.max_bytes or len(self.lines) >= self.max_lines:
            self.truncated = True
            return False
        self.lines.append(log_entry(stream, line, ts))
        return True


class Worker:
    """Owns one nsjail process. Use ``start()``, ``invoke()``, ``aclose()``."""

    def __init__(
        self,
        config: JailConfig,
        spec: JailSpec,
        *,
        proxy_handler: ProxyHandler | None = None,
        proxy_rate_per_s: float = 200.0,
    ) -> None:
        self.config = config
        self.spec = spec
        self.proxy: HostProxy | None = None
        if proxy_handler is not None:
            self.proxy = HostProxy(
                config.runtime_dir.parent / "sock", proxy_handler, rate_per_s=proxy_rate_per_s
            )
        self.proc: asyncio.subprocess.Process | None = None
        self.jail_pid: int | None = None
        self.ready = False
        self.load_error: dict[str, Any] | None = None
        self.invocations = 0
        self.last_used = 0.0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._nsjail_log = bytearray()
        self._own = _Collector(spec.limits.log_bytes, spec.limits.log_lines)
        self._closed = False
        self._jail_pidfd: int | None = None
        self.slot: str | None = None
        self._last_counters: dict[str, int] | None = None

    @property
    def nsjail_log(self) -> str:
        return self._nsjail_log.decode("utf-8", "replace")

    @property
    def alive(self) -> bool:
        return (
            self.ready
            and not self._closed
            and self.proc is not None
            and self.proc.returncode is None
        )

    async def start(self) -> None:
        """Spawn the jail and wait for the runtime's ready (or load_error) frame.

        The caller bounds this with its own deadline; on any failure the
        worker is closed and WorkerError raised (load errors are not failures:
        they are reported by ``invoke`` as the ``error`` outcome).
        """
        if self.proxy is not None:
            try:
                await self.proxy.start()
            except OSError as exc:
                raise WorkerError(f"cannot create the proxy socket: {exc}") from None
            self.spec = replace(self.spec, proxy_dir=self.proxy.dir)
        limits = slot_limits(self.spec)
        launchers = self.config.launchers
        prepared = launchers.take() if launchers is not None else None
        if prepared is not None:
            host, log_r = await self._launch_prepared(prepared, limits)
        else:
            host, log_r = await self._launch(limits)
        self._reader, self._writer = await asyncio.open_unix_connection(sock=host)
        proc = self.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        self._tasks = [
            asyncio.create_task(self._pump(proc.stdout, "stdout")),
            asyncio.create_task(self._pump(proc.stderr, "stderr")),
            asyncio.create_task(self._pump_fd(log_r)),
        ]
        try:
            header, _ = await self._read_frame(0)
        except (WorkerError, asyncio.CancelledError):
            await self.aclose(kill=True)
            raise
        if header.get("op") == "load_error":
            self.load_error = header
        elif header.get("op") != "ready":
            await self.aclose(kill=True)
            raise WorkerError(f"unexpected first frame {header.get('op')!r}")
        self.ready = True
        self.jail_pid = next(iter(cg.children_of(proc.pid)), None)
        if self.jail_pid is not None:
            with contextlib.suppress(OSError):
                # A pidfd pins the process: a later kill can never hit a reused pid.
                self._jail_pidfd = os.pidfd_open(self.jail_pid)

    async def _launch(self, limits: SlotLimits) -> tuple[socket.socket, int]:
        """Start nsjail through the plain launcher, which joins the slot itself."""
        try:
            slot = self.config.slots.acquire_free(limits)
            if slot is None:  # making a new cgroup (mkdir) goes to a thread
                slot = await asyncio.to_thread(self.config.slots.acquire, limits)
            self.slot = slot
        except OSError as exc:
            raise WorkerError(f"cannot prepare the jail's cgroup: {exc}") from None
        host, jail = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_r, log_w = os.pipe()
        try:
            cmd = build_command(
                self.config,
                self.spec,
                ctl_fd=jail.fileno(),
                log_fd=log_w,
                cgroup_procs=self.config.slots.procs_files(slot),
            )
            self.proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(jail.fileno(), log_w),
                start_new_session=True,
            )
        except OSError as exc:
            host.close()
            os.close(log_r)
            raise WorkerError(f"cannot start nsjail: {exc}") from None
        finally:
            jail.close()
            os.close(log_w)
        return host, log_r

    async def _launch_prepared(
        self, prepared: Prepared, limits: SlotLimits
    ) -> tuple[socket.socket, int]:
        """Hand nsjail's command line to a launcher already inside its slot."""
        self.slot = prepared.slot
        self.proc = prepared.proc
        try:
            self.config.slots.configure(prepared.slot, limits)
            cmd = build_command(
                self.config,
                self.spec,
                ctl_fd=prepared.ctl_fd,
                log_fd=prepared.log_fd,
                cgroup_procs=self.config.slots.procs_files(prepared.slot),
            )
            prepared.launch(cmd[cmd.index(str(self.config.nsjail)) :])
        except OSError as exc:
            prepared.ctl.close()
            os.close(prepared.log_r)
            raise WorkerError(f"cannot start nsjail: {exc}") from None
        return prepared.ctl, prepared.log_r

    async def invoke(
        self, inv: Invocation, *, start: str = "cold", deadline: float | None = None
    ) -> JailResult:
        """Run one invocation; never raises for anything the function does.

        ``deadline`` (monotonic) is the end of the function's one timeout when
        part of it was already spent starting this worker (the cold path).
        """
        lim = self.spec.limits
        t0 = time.monotonic()
        budget = lim.timeout_s if deadline is None else max(0.0, deadline - t0)
        end = Ending(limits=lim)
        logs = _Collector(lim.log_bytes, lim.log_lines)
        for entry in self._own.lines:
            logs.add(entry.stream, entry.message)
        self._own = _Collector(lim.log_bytes, lim.log_lines)
        self.invocations += 1
        self.last_used = t0
        if self.load_error is not None:
            end.load_error = self.load_error
            await self.aclose()
            # The traceback may still have been in the pipe above; aclose drained it.
            for entry in self._own.lines:
                logs.add(entry.stream, entry.message)
            self._own = _Collector(lim.log_bytes, lim.log_lines)
            return self._result(end, logs, t0, start)
        # Counters are cumulative and nothing runs between invocations: the
        # last reading is this one's baseline (two file reads saved per call).
        before = self._last_counters or self._counters()
        if self.proxy is not None:
            self.proxy.begin(
                CallContext(
                    invocation_id=inv.invocation_id,
                    tenant=inv.tenant,
                    function=inv.function,
                    version=inv.version,
                    egress_allow=inv.egress_allow,
                    depth=inv.depth,
                    deadline=t0 + budget,
                )
            )
        try:
            async with asyncio.timeout(budget):
                assert self._writer is not None
                self._writer.write(_frames.encode(inv.frame_header(self.spec), inv.body))
                await self._writer.drain()
                while True:
                    header, body = await self._read_frame(lim.response_bytes)
                    op = header.get("op")
                    if op == "logs":
                        for item in header.get("lines") or []:
                            if isinstance(item, list) and len(item) == 3:
                                ts = item[2] if isinstance(item[2], int | float) else None
                                logs.add(str(item[0]), str(item[1]), ts)
                        if logs.bytes > 2 * lim.log_bytes + 65536:
                            end.host_output_limit = True  # the runtime is not capping: stop it
                            break
                    elif op == "done":
                        end.done, end.result_body = header, body
                        break
                    else:
                        raise WorkerError(f"unexpected frame {op!r}")
        except TimeoutError:
            end.timed_out = True
            end.done = await self._cancel(logs)
        except (WorkerError, ConnectionError):
            pass  # the runtime died or broke the protocol: decided below
        except asyncio.CancelledError:
            # The caller went away (client disconnect, shutdown): the jail must not
            # outlive the invocation, and a half-used worker is never reused.
            await self.aclose(kill=True)
            raise
        finally:
            if self.proxy is not None:
                self.proxy.end()
        after = self._last_counters = self._counters()
        end.oom_kills = after["oom_kill"] - before["oom_kill"]
        end.pids_hits = after["pids_max"] - before["pids_max"]
        broken = end.done is None or end.host_output_limit
        if broken:
            await self.aclose(kill=True)
            end.nsjail_exit = self.proc.returncode if self.proc else None
            end.nsjail_log = self._nsjail_log.decode("utf-8", "replace")
        for entry in self._own.lines:
            logs.add(entry.stream, entry.message)
        self._own = _Collector(lim.log_bytes, lim.log_lines)
        return self._result(end, logs, t0, start)

    def _result(self, end: Ending, logs: _Collector, t0: float, start: str) -> JailResult:
        fields = decide(end)
        done = end.done or {}
        if done.get("early") and end.result_body:
            done = {**done, **frame_usage(end.result_body)}
        cpu = done.get("cpu_ms")
        rss = done.get("maxrss_kb")
        if fields.get("outcome") == "jail_failure":
            logs.add("runtime", "nsjail: " + end.nsjail_log[-2000:])
        return JailResult(
            logs=tuple(logs.lines),
            logs_truncated=logs.truncated or fields.get("limit_name") == "output",
            wall_ms=(time.monotonic() - t0) * 1000.0,
            cpu_ms=float(cpu) if isinstance(cpu, int | float) else None,
            peak_memory_mb=round(rss / 1024.0, 2) if isinstance(rss, int | float) else None,
            start="warm" if start == "warm" else "cold",
            **fields,
        )

    async def _cancel(self, logs: _Collector) -> dict[str, Any] | None:
        """Past the deadline: ask the zygote to kill the child and wait briefly
        for its "done". The worker stays warm if that comes (a timeout then
        costs the next call no cold start); None means it did not, and the
        caller closes the whole jail."""
        assert self._writer is not None
        if self.slot is not None and self.jail_pid is not None and self.proc is not None:
            # A CPU loop or fork bomb has used up the slot's CPU quota, which the
            # zygote shares: at a low quota it would get to run (and kill them)
            # only after several periods. The gateway kills them from outside
            # instead, sparing nsjail and the zygote, which then just reaps.
            self.config.slots.kill_all_but(self.slot, {self.proc.pid, self.jail_pid})
        try:
            async with asyncio.timeout(CANCEL_GRACE_S):
                self._writer.write(_frames.encode({"op": "cancel"}))
                await self._writer.drain()
                while True:
                    header, _ = await self._read_frame(self.spec.limits.response_bytes)
                    if header.get("op") == "done":
                        return header
                    for item in header.get("lines") or []:
                        if isinstance(item, list) and len(item) == 3:
                            logs.add(str(item[0]), str(item[1]))
        except (TimeoutError, WorkerError, ConnectionError):
            return None

    def _counters(self) -> dict[str, int]:
        if self.slot is None:
            return {"oom_kill": 0, "pids_max": 0}
        return self.config.slots.counters(self.slot)

    async def _read_frame(self, max_body: int) -> tuple[dict[str, Any], bytes]:
        assert self._reader is not None
        try:
            prefix = await self._reader.readexactly(_frames.PREFIX.size)
            hlen, blen = _frames.PREFIX.unpack(prefix)
            _frames.check_lengths(hlen, blen, max_body + _frames.MAX_HEADER + 64)
            header = _frames.decode_header(await self._reader.readexactly(hlen))
            body = await self._reader.readexactly(blen) if blen else b""
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise WorkerError("the runtime closed its control channel") from exc
        except _frames.FrameError as exc:
            raise WorkerError(str(exc)) from None
        return header, body

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        """The runtime's own stdout/stderr (import-time prints, load tracebacks)."""
        with contextlib.suppress(Exception):
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    return
                for line in chunk.decode("utf-8", "replace").splitlines():
                    self._own.add(name, line)

    async def _pump_fd(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            while chunk := await reader.read(65536):
                if len(self._nsjail_log) < NSJAIL_LOG_CAP:
                    self._nsjail_log += chunk[: NSJAIL_LOG_CAP - len(self._nsjail_log)]
        finally:
            transport.close()

    async def aclose(self, *, kill: bool = False) -> None:
        """End the jail: politely (EOF) unless ``kill``, then forcibly; always reaped.

        Shielded from cancellation so a cancelled request never leaves a
        running jail, a zombie or a cgroup behind.
        """
        if self._closed:
            return
        self._closed = True
        await asyncio.shield(self._close(kill))

    async def _close(self, kill: bool) -> None:
        proc = self.proc
        if self._writer is not None:
            self._writer.close()
        if proc is not None and proc.returncode is None:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)  # nsjail kills the jail and its cgroups
            try:
                await asyncio.wait_for(proc.wait(), CLOSE_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), CLOSE_GRACE_S)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        if self._jail_pidfd is not None:
            # nsjail normally kills the jail and removes its cgroups; if nsjail
            # itself was SIGKILLed it could not, so do both here.
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._jail_pidfd, signal.SIGKILL)
            os.close(self._jail_pidfd)
            self._jail_pidfd = None
        if self.slot is not None:
            # Dying processes leave the cgroup a moment after their parent saw them go.
            for _ in range(100):
                if not self.config.slots.pids_in(self.slot):
                    break
                await asyncio.sleep(0.01)
            self.config.slots.release(self.slot)
            self.slot = None
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=CLOSE_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self.proxy is not None:
            await self.proxy.aclose()


async def start_within_timeout(worker: Worker, t0: float) -> JailResult | None:
    """Start a worker within its function's timeout. A failed start is the
    invocation's result (``timeout`` or ``jail_failure``); None means started."""
    lim = worker.spec.limits
    try:
        async with asyncio.timeout(lim.timeout_s):
            await worker.start()
    except TimeoutError:
        await worker.aclose(kill=True)
        fields = decide(Ending(limits=lim, timed_out=True))
        return JailResult(wall_ms=(time.monotonic() - t0) * 1000.0, **fields)
    except WorkerError as exc:
        await worker.aclose(kill=True)
        return JailResult(
            outcome="jail_failure",
            wall_ms=(time.monotonic() - t0) * 1000.0,
            error_type="JailFailure",
            error_message=f"{exc}; nsjail said: {worker.nsjail_log[-500:]}",
        )
    return None
