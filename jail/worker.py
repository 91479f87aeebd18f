"""One jailed runtime process (nsjail + bootstrap) and the protocol to drive it.

A worker serves one invocation at a time. The cold path starts a worker in
``once`` mode for a single invocation; the warm path keeps ``warm`` workers
in a pool. Both use exactly this code, so every limit behaves the same.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import fcntl
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import cgroups as cg
from .cgroups import SlotLimits
from .command import JailConfig, JailSpec, build_command, slot_limits
from .errors import WorkerError, WorkerGone
from .launcher import Prepared
from .limits import Limits
from .proxy import CallContext, HostProxy, ProxyHandler
from .result import (
    RESULT_MAX_HEADER,
    Ending,
    JailResult,
    LogEntry,
    decide,
    jail_header,
    log_entry,
    usage_number,
)
from .runtime import _frames
from .spawn import Process, read_fd, read_some, spawn

NSJAIL_LOG_CAP = 64 * 1024
CLOSE_GRACE_S = 1.0
CANCEL_GRACE_S = 0.5  # for the zygote to kill a timed-out child and report its exit
# A call still running after this long yields contended CPU to shorter ones
# (its slot's CPU weight drops until it ends; cgroups.set_long_call): a CPU
# loop or fork bomb then runs on what the quick calls leave, not beside them.
LONG_CALL_S = 0.05
EXIT_GRACE_S = 0.5  # after a whole answer, a child has this long to exit before SIGKILL
START_EXIT_GRACE_S = 0.5  # for nsjail to exit once the runtime died while loading
MAX_LINE = 16 * 1024  # longer lines are split: a line is a log record, not a payload
STRAY_CAP = 1 << 20  # output between two invocations that retires a worker (see _stray)
# Control frames are small JSON objects without a body, decoded on the event
# loop; the largest, a load error, has 2,000 characters of message and 200 of
# type name, up to 12 bytes each once escaped (an emoji is two \uXXXX).
CONTROL_FRAME_CAP = 32 * 1024
# A child's output channels, after its stdin (see _make_channels).
OUTPUTS = ("stdout", "stderr", "ctx", "result")


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
    # The tenant's log budget (see _Collector): may a line of n bytes be kept?
    log_gate: Callable[[int], bool] | None = field(default=None, repr=False, compare=False)

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
    """Log lines of one invocation, capped by bytes and lines. ``gate`` (the
    tenant's log budget) says whether a line of this many bytes may be
    stored: a line it refuses is counted and dropped before it is decoded
    (a JSON line is parsed on the event loop, and a flood of them cost every
    tenant's calls, however many the budget then dropped)."""

    def __init__(
        self, max_bytes: int, max_lines: int, gate: Callable[[int], bool] | None = None
    ) -> None:
        self.lines: list[LogEntry] = []
        self.bytes = 0
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.truncated = False
        self.gate = gate
        self.gated = 0  # lines the gate refused
        self.over_lines = False  # truncated at the line cap, not the byte cap

    def add(self, stream: str, line: str, ts: float | None = None) -> bool:
        """Keep the line if under the caps; False once over them."""
        if self.truncated:
            return False
        self.bytes += len(line) + 1
        if self.bytes > self.max_bytes or len(self.lines) + self.gated >= self.max_lines:
            self.truncated = True
            self.over_lines = self.bytes <= self.max_bytes
            return False
        if self.gate is not None and not self.gate(len(line)):
            self.gated += 1
            return True
        self.lines.append(log_entry(stream, line, ts))
        return True


class _Control:
    """The gateway's end of a runtime's control socket.

    From the runtime: ``ready``/``load_error``, then one ``exited`` per child.
    To it: ``pipes`` (a child's ends of its five pipes, SCM_RIGHTS), ``cancel``,
    ``exit``. What comes from inside the jail is checked (sizes, JSON, no
    body); anything else breaks the channel, which retires the worker. File
    descriptors the runtime might send are never accepted (plain recv drops them).
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.frames: collections.deque[dict[str, Any]] = collections.deque()
        self.exited: dict[int, dict[str, Any]] = {}
        self.child = 0  # the number of the child in use (Worker._child)
        self.broken: str | None = None
        self.waiters: list[asyncio.Future[None]] = []  # settled on anything new
        self._buf = bytearray()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def read_now(self) -> None:
        """Take every frame already sent, without waiting for the event loop."""
        while self.broken is None and self._readable():
            pass

    def _readable(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.fail(f"the control channel failed: {exc}")
            return False
        if not data:
            self.fail("the runtime closed its control channel")
            return False
        self._buf += data
        while len(self._buf) >= _frames.PREFIX.size:
            hlen, blen = _frames.PREFIX.unpack_from(self._buf)
            if hlen > CONTROL_FRAME_CAP or blen:
                self.fail("the runtime sent an oversized control frame")
                return False
            if len(self._buf) < _frames.PREFIX.size + hlen:
                break
            raw = bytes(self._buf[_frames.PREFIX.size : _frames.PREFIX.size + hlen])
            del self._buf[: _frames.PREFIX.size + hlen]
            try:
                header = jail_header(raw)
            except _frames.FrameError as exc:
                self.fail(str(exc))
                return False
            if header.get("op") == "exited" and isinstance(header.get("n"), int):
                # One per child, for the child in use or the one forked for the
                # next call: the control fd is open during the import, and
                # tenant code there sent thousands (each decoded on the loop).
                n = header["n"]
                if n in self.exited or not self.child <= n <= self.child + 1:
                    self.fail("the runtime sent an unexpected exit report")
                    return False
                self.exited[n] = header
                if len(self.exited) > 2:
                    self.exited.pop(min(self.exited))
                if header.get("retire"):
                    # The runtime could not reset itself (/tmp) and is exiting:
                    # no later invocation may be given to it.
                    self.fail(f"the runtime retired: {str(header['retire'])[:200]}")
                    return False
            elif len(self.frames) < 8:
                self.frames.append(header)
            else:
                self.fail("the runtime sent unexpected control frames")
                return False
        self._wake()
        return True

    def fail(self, reason: str) -> None:
        """The channel (and so the worker) is unusable from now on."""
        if self.broken is None:
            self.broken = reason
            self._loop.remove_reader(self.sock.fileno())
        self._wake()

    def _wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            _settle(fut)

    async def wait(self) -> None:
        """Until something new arrives (or the channel breaks)."""
        if self.broken is not None:
            raise WorkerError(self.broken)
        fut = self._loop.create_future()
        self.waiters.append(fut)
        await fut

    async def frame(self) -> dict[str, Any]:
        while not self.frames:
            await self.wait()
        return self.frames.popleft()

    def send(self, header: dict[str, Any], fds: list[int] | None = None) -> None:
        """A small frame to the runtime, with file descriptors attached if any.

        The runtime reads its control socket whenever it is not forking, so a
        full socket buffer means it stopped: the channel breaks.
        """
        data = _frames.encode(header)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            if self.sock.sendmsg([data], rights) != len(data):
                self.fail("the runtime stopped reading its control channel")
        except OSError as exc:
            self.fail(f"the control channel failed: {exc}")

    def close(self) -> None:
        if self.broken is None:
            self._loop.remove_reader(self.sock.fileno())
            self.broken = "closed"
        self.sock.close()
        self._wake()


def _make_channels() -> tuple[socket.socket, list[int], list[int]]:
    """A worker's channels to its children: (the gateway's end of stdin, its ends
    of the outputs, the jail's ends).

    In the order of a child's fds 0, 1, 2, 4, 3: stdin (a socket: the child
    answers one byte on it once it has read its request), stdout, stderr,
    ctx.log lines, the result (pipes). Made here, once per worker:
    only the jail's ends enter the jail, so nothing there shares an open file
    description with the gateway (it could otherwise flip O_NONBLOCK and block
    the event loop), and no invocation pays for new pipes or fd passing.
    """
    stdin, jail = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stdin.setblocking(False)
    outputs: list[int] = []
    theirs = [jail.detach()]
    for _ in OUTPUTS:
        r, w = os.pipe2(os.O_CLOEXEC)
        fcntl.fcntl(r, fcntl.F_SETFL, os.O_NONBLOCK)
        outputs.append(r)
        theirs.append(w)
    return stdin, outputs, theirs


class _ChildRun:
    """What one child said: log lines (split and capped here) and its result frame.

    Past a cap (log bytes or lines, response size) the run stops taking
    output and says which limit was hit.
    """

    def __init__(self, lim: Limits, logs: _Collector) -> None:
        self.logs = logs
        self.log_bytes_cap = lim.log_bytes
        self.response_cap = lim.response_bytes
        self.log_bytes = 0
        self.partial: dict[str, bytes] = {"stdout": b"", "stderr": b"", "ctx": b""}
        self.result = bytearray()
        self.result_size = 0  # of the whole frame, once its prefix is in
        self.result_bytes = 0  # everything written to the result pipe
        self.limit: str | None = None
        self.complete = False  # a whole result frame is in
        self.waiters: list[asyncio.Future[None]] = []  # settled when complete or capped

    def feed(self, stream: str, data: bytes) -> None:
        if self.limit:
            return
        if stream != "result":
            self._add_output(stream, data)
        elif not self.complete:  # anything after the frame is not the answer
            self._add_result(data)

    def _add_result(self, data: bytes) -> None:
        self.result_bytes += len(data)
        if self.result_bytes > self.response_cap + RESULT_MAX_HEADER + _frames.PREFIX.size:
            self._finish("response")  # however it is framed, no answer is this big
            return
        if self.result_size < 0:
            return  # not a frame: the child's exit decides (no result)
        self.result += data
        if not self.result_size and len(self.result) >= _frames.PREFIX.size:
            hlen, blen = _frames.PREFIX.unpack_from(self.result)
            if hlen > RESULT_MAX_HEADER:
                self.result_size = -1
                return
            if blen > self.response_cap:
                self._finish("response")
                return
            self.result_size = _frames.PREFIX.size + hlen + blen
        if self.result_size and len(self.result) >= self.result_size:
            del self.result[self.result_size :]
            self.complete = True
            self._finish(None)

    def _add_output(self, stream: str, data: bytes) -> None:
        self.log_bytes += len(data)
        if self.log_bytes > self.log_bytes_cap:
            self._finish("output")
            return
        *lines, rest = (self.partial[stream] + data).split(b"\n")
        while len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self.partial[stream] = rest
        now = time.time()
        for line in lines:
            if not self.logs.add(stream, line.decode("utf-8", "replace"), now):
                self._finish("output_lines" if self.logs.over_lines else "output")
                return

    def flush_partials(self) -> None:
        """The child is done: unterminated last lines are lines too."""
        if self.limit:
            return
        now = time.time()
        for stream, rest in self.partial.items():
            if rest and not self.logs.add(stream, rest.decode("utf-8", "replace"), now):
                self.limit = "output_lines" if self.logs.over_lines else "output"
                return
        self.partial = {"stdout": b"", "stderr": b"", "ctx": b""}

    def _finish(self, limit: str | None) -> None:
        self.limit = self.limit or limit
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            _settle(fut)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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
        self.proc: Process | None = None
        self.jail_pid: int | None = None
        self.ready = False
        self.load_error: dict[str, Any] | None = None
        self.invocations = 0
        self.last_used = 0.0
        # WarmPool.watch_idle's last reading: CPU ms and the processes of the slot
        self.idle_cpu_mark: tuple[float, frozenset[int]] | None = None
        self.idle_busy_looks = 0  # looks in a row that found it busy
        self.idle_cpu_base: float | None = None  # its CPU ms at the first look
        self._ctl: _Control | None = None
        self._child = 0  # the number of the last child this worker used
        self._stdin: socket.socket | None = None  # the children's stdin (our end)
        self._outputs: dict[int, str] = {}  # our ends of the children's outputs
        self._drain_poll = select.poll()  # on the outputs: the drain's one syscall
        self._run: _ChildRun | None = None  # the child whose output we are taking
        self._desynced = False  # a child died with its request half read: retire
        self._stray_bytes = 0  # output since the last invocation began (see _stray)
        self._own_bytes = 0  # the runtime's own output since then (see _pump)
        self._retiring: str | None = None  # why no further invocation may come here
        self._closer: asyncio.Task[None] | None = None
        self._exit_check: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._nsjail_log = bytearray()
        self._own = _Collector(spec.limits.log_bytes, spec.limits.log_lines)
        self._closed = False
        self._jail_pidfd: int | None = None
        self.slot: str | None = None
        self._last_counters: dict[str, int] | None = None
        self._loading = False  # the runtime said it is importing the function
        self._single_use: Any = None  # why this worker may serve one invocation only
        self._death: tuple[int, int] | None = None  # (nsjail exit, OOM kills) if it died loading
        self._long_call = False  # the slot is at its long-call weight

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
            and (self._ctl is None or self._ctl.broken is None)
            and not self._desynced
            and self._retiring is None
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
        # A spare launcher waits in an unboxed slot: a boxed jail starts plainly.
        prepared = launchers.take() if launchers is not None and not limits.boxed else None
        if prepared is not None:
            host, log_r = await self._launch_prepared(prepared, limits)
        else:
            host, log_r = await self._launch(limits)
        self._ctl = _Control(host)
        self._open_channels()  # the runtime forks its first child on them once loaded
        proc = self.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        self._tasks = [
            asyncio.create_task(self._pump(proc.stdout, "stdout")),
            asyncio.create_task(self._pump(proc.stderr, "stderr")),
            asyncio.create_task(self._pump_fd(log_r)),
        ]
        try:
            header = await self._ctl.frame()
            if header.get("op") == "loading":
                # From here on the function's own import runs: if the runtime
                # dies now, that is the function's failure, not the jail's.
                self._loading = True
                header = await self._ctl.frame()
        except WorkerError:
            await self._note_death()
            await self.aclose(kill=True)
            raise
        except asyncio.CancelledError:
            await self.aclose(kill=True)
            raise
        if header.get("op") == "load_error":
            self.load_error = header
        elif header.get("op") != "ready":
            await self.aclose(kill=True)
            raise WorkerError(f"unexpected first frame {header.get('op')!r}")
        self.ready = True
        self._single_use = header.get("single_use")
        self._last_counters = None  # the first invocation reads its own baseline
        self.jail_pid = next(iter(cg.children_of(proc.pid)), None)
        if self.jail_pid is not None:
            with contextlib.suppress(OSError):
                # A pidfd pins the process: a later kill can never hit a reused pid.
                self._jail_pidfd = os.pidfd_open(self.jail_pid)

    async def _note_death(self) -> None:
        """The runtime closed its channel before it was ready: how it ended
        (nsjail's exit status, OOM kills in its slot), for ``start_failed``."""
        proc = self.proc
        if proc is None or self.slot is None or not self._loading:
            return
        if proc.returncode is None:
            # The runtime is gone: nsjail follows in a moment.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), START_EXIT_GRACE_S)
        if proc.returncode is None:
            return
        before, after = self._last_counters, self._counters()
        oom = after["oom_kill"] - before["oom_kill"] if before else 0
        self._death = (proc.returncode, oom)

    async def start_failed(self, exc: WorkerError, t0: float) -> JailResult:
        """The invocation's result when ``start`` failed: ``jail_failure`` if nsjail
        could not run the jail, else what the function's import did to the
        runtime (an exit, a signal, the memory limit), with what it printed."""
        await self.aclose(kill=True)  # (start already did; the logs are drained)
        code, oom = self._death or (None, 0)
        end = Ending(
            limits=self.spec.limits,
            nsjail_exit=code,
            nsjail_log=self.nsjail_log,
            oom_kills=oom,
            loading=self._death is not None,
        )
        fields = decide(end)
        if fields["outcome"] == "jail_failure" or self._death is None:
            fields = {
                "outcome": "jail_failure",
                "error_type": "JailFailure",
                "error_message": f"{exc}; nsjail said: {self.nsjail_log[-500:]}",
            }
        return JailResult(
            logs=tuple(self._own.lines),
            logs_truncated=self._own.truncated,
            wall_ms=(time.monotonic() - t0) * 1000.0,
            **fields,
        )

    async def _launch(self, limits: SlotLimits) -> tuple[socket.socket, int]:
        """Start nsjail through the plain launcher, which joins the slot itself."""
        try:
            slot = self.config.slots.acquire_free(limits)
            if slot is None:  # making a new cgroup (mkdir) goes to a thread
                slot = await asyncio.to_thread(self.config.slots.acquire, limits)
            self.slot = slot
        except OSError as exc:
            raise WorkerError(f"cannot prepare the jail's cgroup: {exc}") from None
        self._last_counters = self._counters()  # baseline: an OOM at import is counted
        host, jail = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_r, log_w = os.pipe()
        try:
            cmd = build_command(
                self.config,
                self.spec,
                ctl_fd=jail.fileno(),
                log_fd=log_w,
                cgroup_procs=self.config.slots.procs_files(slot),
                uid=self.config.slots.uid(slot),
            )
            self.proc = await spawn(cmd, stdin=False, pass_fds=(jail.fileno(), log_w))
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
        self._last_counters = self._counters()  # baseline: an OOM at import is counted
        try:
            self.config.slots.configure(prepared.slot, limits)
            cmd = build_command(
                self.config,
                self.spec,
                ctl_fd=prepared.ctl_fd,
                log_fd=prepared.log_fd,
                cgroup_procs=self.config.slots.procs_files(prepared.slot),
                uid=self.config.slots.uid(prepared.slot),
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
        logs = _Collector(lim.log_bytes, lim.log_lines, inv.log_gate)
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
        # Counters are cumulative: the last reading is this one's baseline (two
        # file reads saved per call), unless the previous child answered early
        # and might still have run (None: read once it is reported gone).
        before = self._last_counters
        call_ctx = CallContext(
            invocation_id=inv.invocation_id,
            tenant=inv.tenant,
            function=inv.function,
            version=inv.version,
            egress_allow=inv.egress_allow,
            depth=inv.depth,
            deadline=t0 + budget,
        )
        run: _ChildRun | None = None
        writing: asyncio.Task[None] | None = None
        long_call = asyncio.get_running_loop().call_later(LONG_CALL_S, self._set_long_call, True)
        try:
            async with asyncio.timeout(budget):
                n = await self._next_child()
                if before is None:
                    before = self._counters()
                if self.proxy is not None:
                    # Only now, with the previous child and everything it started
                    # reported gone (a child that answered early may linger up to
                    # EXIT_GRACE_S): begin() closes every connection made before,
                    # so none of theirs can speak for this invocation.
                    self.proxy.begin(call_ctx)
                run = self._run = _ChildRun(lim, logs)
                header = inv.frame_header(self.spec)
                header["n"] = n  # a child runs only the request meant for it
                writing = self._write_request(_frames.encode(header, inv.body))
                end.done = await self._finish(n, run)
        except TimeoutError:
            end.timed_out = True
            if run is not None:  # else the previous child never went: the jail is stuck
                end.done = await self._cancel(self._child)
        except WorkerGone:
            self.invocations -= 1
            await self.aclose(kill=True)
            raise  # nothing ran: the pool gives the invocation to another worker
        except WorkerError:
            pass  # the runtime died or broke the protocol: decided below
        except asyncio.CancelledError:
            # The caller went away (client disconnect, shutdown): the jail must not
            # outlive the invocation, and a half-used worker is never reused.
            self._run = None
            await self.aclose(kill=True)
            raise
        finally:
            long_call.cancel()
            if self._long_call:
                self._set_long_call(False)
            if self.proxy is not None:
                self.proxy.end()
            if writing is not None and not writing.done():
                # The child ended without reading its whole request: the rest could
                # reach the next child, so this worker is not used again.
                writing.cancel()
                end.done = None
        self._run = None
        if self._single_use:
            self._retiring = str(self._single_use)[:200]  # the pool closes it now
        if run is not None and not run.complete and end.done is not None:
            if not self._take_acks():
                # The child died before it had read its whole request: what is
                # left of it could reach the next child. This worker is done.
                self._desynced = True
        if run is not None and end.done is not None and not end.timed_out and not run.limit:
            end.result_body = bytes(run.result)
        after = self._counters()
        if before is None:  # the previous child never went: nothing of this one ran
            before = after
        # A child that answered early may run on (up to EXIT_GRACE_S): its
        # pids-limit hits and OOM kills after this reading are neither this
        # call's (it answered) nor the next's, whose baseline is read after it.
        self._last_counters = None if (end.done or {}).get("early") else after
        end.oom_kills = after["oom_kill"] - before["oom_kill"]
        end.pids_hits = after["pids_max"] - before["pids_max"]
        if end.done is None:
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
        if done.get("early") and end.reported_usage:
            done = {**done, **end.reported_usage}
        cpu = usage_number(done.get("cpu_ms"))
        rss = usage_number(done.get("maxrss_kb"))
        if fields.get("outcome") == "jail_failure":
            logs.add("runtime", "nsjail: " + end.nsjail_log[-2000:])
        return JailResult(
            logs=tuple(logs.lines),
            logs_truncated=logs.truncated or fields.get("limit_name") == "output",
            logs_dropped=logs.gated,
            wall_ms=(time.monotonic() - t0) * 1000.0,
            cpu_ms=cpu,
            peak_memory_mb=round(rss / 1024.0, 2) if rss is not None else None,
            start="warm" if start == "warm" else "cold",
            **fields,
        )

    def _open_channels(self) -> None:
        assert self._ctl is not None
        self._stdin, outputs, theirs = _make_channels()
        try:
            self._ctl.send({"op": "channels"}, theirs)
        finally:
            for fd in theirs:
                os.close(fd)
        loop = asyncio.get_running_loop()
        for fd, name in zip(outputs, OUTPUTS, strict=True):
            self._outputs[fd] = name
            self._drain_poll.register(fd, select.POLLIN)
            loop.add_reader(fd, self._output, fd, name)

    def _output(self, fd: int, name: str) -> None:
        data = read_some(fd)
        if data is None:
            return
        if not data:  # the runtime is gone (it holds the other ends)
            asyncio.get_running_loop().remove_reader(fd)
            return
        if self._run is not None:
            self._run.feed(name, data)
        else:
            self._stray(len(data))

    def _stray(self, n: int) -> None:
        """Output while no invocation runs (a straggler after its answer, before it
        is killed) is dropped. More than STRAY_CAP of it between two invocations
        means something in the jail that is never killed writes (a thread the
        module started at import): the worker is retired and stops being read."""
        self._stray_bytes += n
        if self._stray_bytes > STRAY_CAP and self._ctl is not None:
            loop = asyncio.get_running_loop()
            for fd in self._outputs:
                loop.remove_reader(fd)
            self._ctl.fail("output between invocations over its cap")

    def _drain_outputs(self) -> None:
        """Take everything already written to the children's outputs."""
        if not self._outputs:
            return
        # One syscall, not four; poll, not select: select fails on fds past 1023,
        # which a busy gateway's pipes reach.
        for fd, _ev in self._drain_poll.poll(0):
            name = self._outputs[fd]
            for _ in range(64):  # bounded: a full pipe holds 64 KiB
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                if self._run is not None:
                    self._run.feed(name, data)
                else:
                    self._stray(len(data))

    async def _next_child(self) -> int:
        """The number of the child that takes the next request.

        The previous child must be reported gone first: its stragglers are dead,
        so what is left in the outputs is the previous invocation's (dropped
        here) and the request written now can only be read by the next child
        (which runs it only if it carries its number; a child that died with its
        request half read has retired the worker, see ``invoke``).
        """
        ctl = self._ctl
        if ctl is None or self._stdin is None:
            raise WorkerError("the worker has no channels")
        try:
            while self._child and self._child not in ctl.exited:
                await ctl.wait()
        except WorkerError as exc:
            raise WorkerGone(str(exc)) from None
        self._run = None
        self._drain_outputs()
        if ctl.broken is not None or self._retiring is not None:
            # It retired, or output between calls went over its cap.
            raise WorkerGone(ctl.broken or self._retiring or "retired")
        self._stray_bytes = self._own_bytes = 0
        self._take_acks()
        self._child += 1
        ctl.child = self._child
        return self._child

    def _take_acks(self) -> bool:
        """Whether a child said (one byte on its stdin) it read its request whole."""
        assert self._stdin is not None
        try:
            return bool(self._stdin.recv(4096, socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False

    def _write_request(self, data: bytes) -> asyncio.Task[None] | None:
        """Write the request into the children's stdin; a task if it did not fit."""
        sock = self._stdin
        assert sock is not None
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return None  # the runtime is gone: its exit (or EOF) says how
        if sent == len(data):
            return None
        loop = asyncio.get_running_loop()
        return asyncio.create_task(loop.sock_sendall(sock, data[sent:]))

    async def _finish(self, n: int, run: _ChildRun) -> dict[str, Any]:
        """Until the child's answer is complete (or it ended without one).

        A whole result frame is the answer, even before the child's exit is
        reported ("early": its exit and the runtime's clean-up happen off the
        critical path; a child that outlives its answer by EXIT_GRACE_S is
        killed). Everything the child logged before it wrote the result is in
        the output pipes by then and is drained first. Past a cap the child is
        killed at once.
        """
        ctl = self._ctl
        assert ctl is not None
        while True:
            if run.limit:
                self._kill_child(n)
                exited = await self._exited(n, CANCEL_GRACE_S)
                if exited is None:
                    raise WorkerError("the runtime did not report a killed child")
                return {**exited, "limit": run.limit}
            if run.complete:
                self._drain_outputs()
                run.flush_partials()
                if run.limit:
                    continue
                self._exit_check = asyncio.get_running_loop().call_later(
                    EXIT_GRACE_S, self._ensure_exit, n
                )
                return {"early": True, "exit_code": None, "limit": None}
            exited = ctl.exited.get(n)
            if exited is not None:
                # Every process that could write to the outputs is gone: drain them.
                self._drain_outputs()
                run.flush_partials()
                return {**exited, "limit": run.limit}
            if ctl.broken is not None:
                raise WorkerError(ctl.broken)
            event = asyncio.get_running_loop().create_future()
            ctl.waiters.append(event)
            run.waiters.append(event)
            await event

    def _set_long_call(self, long: bool) -> None:
        self._long_call = long
        if self.slot is not None and not self._closed:
            with contextlib.suppress(OSError):  # the slot's next configure rewrites it
                self.config.slots.set_long_call(self.slot, long)

    def _ensure_exit(self, n: int) -> None:
        self._exit_check = None
        if self._closed or self._ctl is None:
            return
        if n not in self._ctl.exited and self._child == n:
            self._ctl.send({"op": "cancel", "n": n})  # it answered but did not exit

    def _kill_child(self, n: int) -> None:
        """Kill the running child and everything it started, from outside and inside."""
        if self.slot is not None and self.jail_pid is not None and self.proc is not None:
            # A CPU loop or fork bomb has used up the slot's CPU quota, which the
            # zygote shares: at a low quota it would get to run (and kill them)
            # only after several periods. The gateway kills them from outside
            # instead, sparing nsjail and the zygote, which then just reaps.
            # The zygote reports a child's end before it forks the next one: if
            # that report is in once the slot's processes are listed, the child
            # is gone and the listing may hold the next child, which must live.
            self.config.slots.kill_all_but(
                self.slot, {self.proc.pid, self.jail_pid}, unless=lambda: self._reported(n)
            )
        if self._ctl is not None:
            self._ctl.send({"op": "cancel", "n": n})

    def _reported(self, n: int) -> bool:
        assert self._ctl is not None
        self._ctl.read_now()
        return n in self._ctl.exited

    async def _exited(self, n: int, grace_s: float) -> dict[str, Any] | None:
        ctl = self._ctl
        assert ctl is not None
        try:
            async with asyncio.timeout(grace_s):
                while n not in ctl.exited:
                    await ctl.wait()
        except (TimeoutError, WorkerError):
            return None
        return ctl.exited[n]

    async def _cancel(self, n: int) -> dict[str, Any] | None:
        """Past the deadline: kill the child and wait briefly for its exit to be
        reported. The worker stays warm if it is (a timeout then costs the next
        call no cold start); None means it was not, and the caller closes the jail."""
        self._kill_child(n)
        exited = await self._exited(n, CANCEL_GRACE_S)
        if exited is None:
            return None
        self._drain_outputs()  # what it logged before it was killed
        if self._run is not None:
            self._run.flush_partials()
        return {**exited, "cancelled": True}

    def _counters(self) -> dict[str, int]:
        if self.slot is None:
            return {"oom_kill": 0, "pids_max": 0}
        return self.config.slots.counters(self.slot)

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        """The runtime's own stdout/stderr (import-time prints, load tracebacks)."""
        with contextlib.suppress(Exception):
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    return
                if self.ready:
                    # Once loaded the runtime itself prints nothing: a stream
                    # of it is a thread the module started (see _stray).
                    self._own_bytes += len(chunk)
                    if self._own_bytes > STRAY_CAP:
                        self._retire("the runtime's own output over its cap")
                        continue  # dropped unread until the jail is gone
                for line in chunk.decode("utf-8", "replace").splitlines():
                    self._own.add(name, line)

    def _retire(self, reason: str) -> None:
        """No invocation comes here again; the jail is closed now if idle, else
        by the pool once the invocation running on it ends."""
        if self._retiring is not None:
            return
        self._retiring = reason
        if self._run is None and not self._closed:
            self._closer = asyncio.create_task(self.aclose(kill=True))

    async def _pump_fd(self, fd: int) -> None:
        """nsjail's log pipe, to EOF (read_fd closes it then, and only then)."""
        reader = read_fd(fd)
        while chunk := await reader.read(65536):
            if len(self._nsjail_log) < NSJAIL_LOG_CAP:
                self._nsjail_log += chunk[: NSJAIL_LOG_CAP - len(self._nsjail_log)]

    def _close_channels(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self._outputs:
            loop.remove_reader(fd)
            self._drain_poll.unregister(fd)
            os.close(fd)
        self._outputs = {}
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None

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
        if self._exit_check is not None:
            self._exit_check.cancel()
        if self._ctl is not None:
            self._ctl.close()
        self._close_channels()
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
        return await worker.start_failed(exc, t0)
    return None
