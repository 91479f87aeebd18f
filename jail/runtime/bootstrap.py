"""Runtime bootstrap: pid 1 of a jail. Stdlib only; never runs on the host.

It imports the function once, tells the gateway it is ready, then serves
invocations one at a time from the control fd. Each invocation runs in a
fresh child forked from this process (the master/child pattern), so no
memory state passes from one invocation to the next. The child talks only
through pipes this process reads: stdout, stderr, structured log lines and one
result frame. The control fd is closed in the child, so nothing the handler
prints, closes or crashes can forge or corrupt what reaches the gateway.

Being pid 1 of the jail's pid namespace also means: signals from inside the
jail cannot kill it, orphans are reparented to it, and kill(-1, SIGKILL)
after each invocation removes every process the invocation left behind.
"""

from __future__ import annotations

import os
import select
import sys
import time

# Start-up time is the cold path's cost: import only what every run needs
# (typing, enum via signal, and traceback alone cost ~8 ms here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Callable
    from typing import Any
else:
    import _signal

# -I leaves the script's folder off sys.path; the runtime comes first so a
# function's own modules cannot shadow it.
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), "/function"]
if TYPE_CHECKING:
    from jail.runtime import _frames
else:
    import _frames

# Imported once in the zygote, not in every forked child: a child should cost a fork.
if TYPE_CHECKING:
    from jail.runtime import sdk as nsfaas
else:
    import nsfaas
import resource  # noqa: E402

if TYPE_CHECKING:
    Handler = Callable[..., Any]
MAX_FD = 1 << 16
SIGKILL = 9
EXIT_GRACE_S = 0.5  # after its answer, a child has this long to exit before SIGKILL

RESULT_FD, LOG_FD = 3, 4
PROXY_SOCKET = "/run/nsfaas/proxy.sock"
MAX_LINE = 16 * 1024  # longer lines are split: a line is a log record, not a payload
CO_COROUTINE = 0x80
# The pid of the process that runs the handler; a process the handler forked
# returns through the same code but must never write a result frame.
_handler_pid = 0


class Invocation:
    """The zygote's view of one running child: pipes, counters, caps."""

    def __init__(self, header: dict[str, Any], ctl: int) -> None:
        self.ctl = ctl
        limits = header.get("limits", {})
        self.log_bytes_cap = int(limits.get("log_bytes", 1 << 20))
        self.log_lines_cap = int(limits.get("log_lines", 10000))
        self.response_cap = int(limits.get("response_bytes", 6 << 20))
        self.log_bytes = 0
        self.log_lines = 0
        self.partial: dict[str, bytes] = {"stdout": b"", "stderr": b"", "ctx": b""}
        self.pending: list[list[str | float]] = []
        self.result = bytearray()
        self.limit: str | None = None

    def add_output(self, stream: str, data: bytes) -> None:
        if self.limit:
            return
        self.log_bytes += len(data)
        if self.log_bytes > self.log_bytes_cap:
            self.limit = "output"
            return
        buf = self.partial[stream] + data
        *lines, rest = buf.split(b"\n")
        while len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self.partial[stream] = rest
        for line in lines:
            self.log_lines += 1
            if self.log_lines > self.log_lines_cap:
                self.limit = "output"
                return
            self.pending.append([stream, line.decode("utf-8", "replace"), time.time()])

    def flush(self, final: bool = False) -> None:
        if final and not self.limit:
            for stream, rest in self.partial.items():
                if rest:
                    self.pending.append([stream, rest.decode("utf-8", "replace"), time.time()])
        if self.pending:
            _frames.write_all(self.ctl, _frames.encode({"op": "logs", "lines": self.pending}))
            self.pending = []

    def add_result(self, data: bytes) -> None:
        self.result += data
        if len(self.result) > self.response_cap + _frames.MAX_HEADER:
            self.limit = "response"


def load(entrypoint: str) -> Handler:
    module_name, _, func_name = entrypoint.partition(":")
    module = __import__(module_name, fromlist=["_"])
    fn: Handler | None = getattr(module, func_name, None)
    if not callable(fn):
        raise TypeError(f"{entrypoint} is not a callable")
    return fn


def run_child(fn: Handler, max_body: int) -> None:
    """Runs in the pre-forked child: waits for its one request, answers, exits."""
    global _handler_pid
    _handler_pid = os.getpid()
    code = 70
    try:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)  # as in any Python
        _warm_up()
        try:
            header, body = _frames.read_frame(0, max_body)
        except (EOFError, _frames.FrameError):
            os._exit(0)  # the worker is shutting down: no invocation for this child
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        cpu = int(header.get("limits", {}).get("cpu_s", 0))
        if cpu > 0:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        ctx = nsfaas.Context(header.get("ctx", {}), log_fd=LOG_FD, proxy_path=PROXY_SOCKET)
        request = nsfaas.Request(header.get("request", {}), body)
        if "logging" in sys.modules:
            _route_logging(ctx)
        try:
            value = fn(request, ctx)
            if hasattr(value, "__await__"):
                import asyncio

                async def _await(aw: Any) -> Any:
                    return await aw

                value = asyncio.run(_await(value))
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are errors too
            _print_exc()
            frame = {"kind": "error", "error_type": type(exc).__name__, "message": str(exc)[:2000]}
            _finish(frame, b"")
        else:
            try:
                status, headers, payload = nsfaas.to_response(value)
            except (TypeError, ValueError) as exc:
                _finish({"kind": "bad_response", "message": str(exc)[:2000]}, b"")
            else:
                _finish({"kind": "ok", "status": status, "headers": headers}, payload)
        code = 0
    except BaseException:
        try:
            _print_exc()
        except BaseException:
            pass
    finally:
        os._exit(code)


def _warm_up() -> None:
    """Touch what every invocation touches before the request arrives.

    A forked child pays a copy-on-write fault on the first write to each
    inherited page (reference counts make reads writes). Doing a dry run of
    the runtime's own path here moves those faults off the request's path.
    """
    meta = {"method": "GET", "path": "/", "query_string": "a=1", "headers": [["a", "b"]]}
    nsfaas.Request(meta, b"")
    nsfaas.to_response({"warm": [1, "x"]})
    _frames.encode({"kind": "ok", "status": 200, "headers": [["a", "b"]]}, b"x")
    _frames.decode_header(b'{"op": "invoke", "ctx": {}, "limits": {"cpu_s": 1}}')


def _print_exc() -> None:
    import traceback  # only on the error path

    traceback.print_exc()


def _finish(frame: dict[str, Any], body: bytes) -> None:
    if os.getpid() != _handler_pid:
        return  # a fork of the handler came back here: only the handler answers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    # Close the log pipes first: once every pipe is at EOF and the result is
    # complete, the zygote can answer without waiting for this process's
    # exit (tearing down its address space is off the critical path).
    for fd in (1, 2, LOG_FD):
        try:
            os.close(fd)
        except OSError:
            pass
    usage = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    frame["usage"] = {
        "cpu_ms": (usage.ru_utime + usage.ru_stime + kids.ru_utime + kids.ru_stime) * 1000.0,
        "maxrss_kb": max(usage.ru_maxrss, kids.ru_maxrss),
    }
    _frames.write_all(RESULT_FD, _frames.encode(frame, body))
    os.close(RESULT_FD)


def _route_logging(ctx: Any) -> None:
    import logging

    standard = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}

    class CtxHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # extra={...} arrives as record attributes: they become fields.
            fields: dict[str, Any] = {k: v for k, v in record.__dict__.items() if k not in standard}
            fields["logger"] = record.name
            if record.exc_info:
                import traceback

                fields["exc"] = "".join(traceback.format_exception(*record.exc_info))
            ctx.log._emit(record.levelname.lower(), record.getMessage(), fields)

    root = logging.getLogger()
    root.handlers[:] = [CtxHandler()]
    root.setLevel(logging.DEBUG)


class Child:
    """A pre-forked child waiting on its stdin for one request.

    Forking happens after the previous invocation (or right after start-up),
    off the request's critical path: an invocation costs two pipe writes.
    """

    def __init__(self, fn: Handler, max_body: int) -> None:
        reads: dict[str, int] = {}
        writes: dict[str, int] = {}
        for name in ("stdin", "stdout", "stderr", "ctx", "result"):
            reads[name], writes[name] = os.pipe()
        pid = os.fork()
        if pid == 0:
            for target, fd in (
                (0, reads["stdin"]),
                (1, writes["stdout"]),
                (2, writes["stderr"]),
                (RESULT_FD, writes["result"]),
                (LOG_FD, writes["ctx"]),
            ):
                os.dup2(fd, target)
            os.closerange(LOG_FD + 1, MAX_FD)  # the control channel above all
            run_child(fn, max_body)
        os.close(reads.pop("stdin"))
        self.request_fd = writes.pop("stdin")
        for fd in writes.values():
            os.close(fd)
        self.pid = pid
        self.pipes = reads

    def serve(self, header: dict[str, Any], body: bytes, ctl: int) -> None:
        inv = Invocation(header, ctl)
        t0 = time.monotonic()
        try:
            _frames.write_all(self.request_fd, _frames.encode(header, body))
        except OSError:
            pass  # the child is gone; its exit status tells the rest
        os.close(self.request_fd)
        pid = self.pid
        by_fd = {fd: name for name, fd in self.pipes.items()}
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        # The gateway may cancel (its deadline passed): kill the child, keep
        # this worker, answer "done" as usual. A closed channel means the same.
        poller.register(ctl, select.POLLIN)
        cancelled = False
        status = rusage = None
        drain_deadline = None
        while by_fd:
            timeout = None
            if drain_deadline is not None:
                timeout = max(0, int((drain_deadline - time.monotonic()) * 1000))
                if timeout == 0:
                    break
            for fd, _ev in poller.poll(timeout):
                if fd == ctl:
                    poller.unregister(ctl)
                    try:
                        _frames.read_frame(ctl, 0)  # {"op": "cancel"}; any frame cancels
                    except (EOFError, _frames.FrameError, OSError):
                        pass
                    cancelled = True
                    if status is None:
                        os.kill(pid, SIGKILL)
                    continue
                if fd == pidfd:
                    _, status, rusage = os.wait4(pid, 0)
                    poller.unregister(pidfd)
                    _kill_stragglers()
                    drain_deadline = time.monotonic() + 1.0
                    continue
                name = by_fd[fd]
                data = os.read(fd, 65536)
                if not data:
                    poller.unregister(fd)
                    os.close(fd)
                    del by_fd[fd]
                elif name == "result":
                    inv.add_result(data)
                else:
                    inv.add_output(name, data)
            if inv.limit and status is None:
                os.kill(pid, SIGKILL)
            inv.flush()
        for fd in by_fd:
            os.close(fd)
        early = status is None and not by_fd and not inv.limit and bool(inv.result)
        if early:
            # Every pipe is closed and the result is whole: answer now, reap after.
            inv.flush(final=True)
            done = {
                "op": "done",
                "cancelled": cancelled,
                "exit_code": None,
                "early": True,
                "limit": None,
                "child_ms": (time.monotonic() - t0) * 1000.0,
            }
            _frames.write_all(ctl, _frames.encode(done, bytes(inv.result)))
            if not select.select([pidfd], [], [], EXIT_GRACE_S)[0]:
                os.kill(pid, SIGKILL)  # the answer is out; nothing may linger
            os.wait4(pid, 0)
            os.close(pidfd)
            _kill_stragglers()
            return
        if status is None or rusage is None:
            _, status, rusage = os.wait4(pid, 0)
        os.close(pidfd)
        _kill_stragglers()
        inv.flush(final=True)
        done = {
            "op": "done",
            "cancelled": cancelled,
            "exit_code": os.waitstatus_to_exitcode(status),
            "cpu_ms": (rusage.ru_utime + rusage.ru_stime) * 1000.0,
            "maxrss_kb": rusage.ru_maxrss,
            "child_ms": (time.monotonic() - t0) * 1000.0,
            "limit": inv.limit,
        }
        _frames.write_all(ctl, _frames.encode(done, bytes(inv.result) if not inv.limit else b""))


def _kill_stragglers() -> None:
    # Only as pid 1 of a pid namespace does kill(-1) mean "everyone in this
    # jail"; run on a host by mistake it would mean every process there.
    if os.getpid() == 1:
        try:
            os.kill(-1, SIGKILL)  # pid 1 is spared: everything else in the jail dies
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.001)


def _wipe_tmp(path: str = "/tmp") -> None:
    """Between warm invocations, leave /tmp as empty as a fresh jail's."""
    if os.getpid() != 1:
        return  # not a jail's pid 1 (a bare run on a host): the host's /tmp is not ours
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                os.chmod(entry.path, 0o700)
                _wipe_tmp(entry.path)
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def main(argv: list[str]) -> int:
    # pid 1 of a pid namespace only receives the signals it has a handler for;
    # Python's own SIGINT handler would let a child kill(1, SIGINT) the zygote.
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    ctl = int(argv[1])
    entrypoint = argv[2]
    once = argv[3] == "once"
    max_body = int(argv[4])
    try:
        fn = load(entrypoint)
        if getattr(getattr(fn, "__code__", None), "co_flags", 0) & CO_COROUTINE:
            import asyncio  # noqa: F401  (import once in the zygote, not per child)
    except BaseException as exc:
        sys.stdout.flush()
        import traceback

        tb = traceback.format_exc()
        sys.stderr.write(tb)
        sys.stderr.flush()
        err = {"op": "load_error", "error_type": type(exc).__name__, "message": str(exc)[:2000]}
        _frames.write_all(ctl, _frames.encode(err))
        _wait_for_eof(ctl)
        return 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Move everything imported so far out of the collector's reach: a child's
    # GC pass would otherwise touch (and copy) every page it inherited.
    import gc

    gc.freeze()
    child: Child | None = Child(fn, max_body)
    _frames.write_all(ctl, _frames.encode({"op": "ready"}))
    while True:
        try:
            header, body = _frames.read_frame(ctl, max_body)
        except (EOFError, _frames.FrameError):
            return 0
        op = header.get("op")
        if op == "invoke" and child is not None:
            child.serve(header, body, ctl)
            child = None
            if not once:
                _wipe_tmp()
                child = Child(fn, max_body)
        elif op == "exit":
            return 0


def _wait_for_eof(fd: int) -> None:
    """Stay alive until the gateway has read our answer and hangs up."""
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
