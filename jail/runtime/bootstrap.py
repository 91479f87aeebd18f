"""Runtime bootstrap: pid 1 of a jail. Stdlib only; never runs on the host.

It imports the function once, tells the gateway it is ready, then forks one
child per invocation (the master/child pattern), so no memory state passes
from one invocation to the next. Each child is forked ahead of its request,
with its fds 0-4 on channels the gateway made once per worker and sent over
the control socket (SCM_RIGHTS): stdin, stdout, stderr, structured log lines
and the result. The gateway writes the request straight into the child and
reads everything the child says, with its caps; this process never relays a
byte (two process wake-ups per invocation instead of four). It forks, reaps,
kills stragglers and reports each child's exit; the gateway writes the next
request only after that report, so a child's channels carry nothing of
another invocation (and retires the worker if a child died before it had
read its whole request). The
control socket is closed in the child, so nothing the handler prints, closes
or crashes can forge a control frame.

Being pid 1 of the jail's pid namespace also means: signals from inside the
jail cannot kill it, orphans are reparented to it, and kill(-1, SIGKILL)
after each invocation removes every process the invocation left behind.
"""

from __future__ import annotations

import _socket  # recvmsg with SCM_RIGHTS; the `socket` module would cost a cold start ~2 ms
import _thread
import os
import select
import struct
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
# function's own modules cannot shadow it, and /function joins only after the
# runtime's imports below: a bundle's json.py must not replace the json the
# runtime itself uses (that failed the runtime before it could report, as a
# jail failure), only the json the function imports.
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
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

sys.path.insert(1, "/function")

if TYPE_CHECKING:
    Handler = Callable[..., Any]
MAX_FD = 1 << 16
SIGKILL = 9

RESULT_FD, LOG_FD = 3, 4
# Pending signals of the whole jail (one uid in one user namespace: one count).
# The kernel charges them to root, who created the namespace, as well, up to
# root's own limit (~96k here): left inherited, one invocation could queue that
# many and make sigqueue fail for every root process on the host.
SIGPENDING = 64
PROXY_SOCKET = "/run/nsfaas/proxy.sock"
CO_COROUTINE = 0x80
# The pid of the process that runs the handler; a process the handler forked
# returns through the same code but must never write a result frame.
_handler_pid = 0


def load(entrypoint: str) -> Handler:
    module_name, _, func_name = entrypoint.partition(":")
    module = __import__(module_name, fromlist=["_"])
    fn: Handler | None = getattr(module, func_name, None)
    if not callable(fn):
        raise TypeError(f"{entrypoint} is not a callable")
    return fn


def run_child(fn: Handler, max_body: int, n: int) -> None:
    """Runs in the pre-forked child: waits for its one request, answers, exits."""
    global _handler_pid
    _handler_pid = os.getpid()
    code = 70
    try:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)  # as in any Python
        null = _warm_up(fn)
        try:
            header, body = _frames.read_frame(0, max_body)
        except (EOFError, _frames.FrameError):
            os._exit(0)  # the worker is shutting down: no invocation for this child
        if header.get("n") != n:
            # Meant for an earlier child that died before reading it: never
            # answer someone else's request (the gateway retires this worker).
            os._exit(75)
        # The gateway learns from this byte that the request was read whole (a
        # child that dies before it is not trusted to have left stdin clean).
        os.write(0, b"\x06")
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
            frame = {"kind": "error", "error_type": type(exc).__name__[:200], "message": _text(exc)}
            _finish(frame, b"")
        else:
            try:
                status, headers, payload = nsfaas.to_response(value)
            except Exception as exc:  # the value's own methods may raise anything
                message = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, TypeError | ValueError):
                    message = str(exc)
                _finish({"kind": "bad_response", "message": message[:2000]}, b"")
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


def _warm_up(fn: Handler) -> int:
    """Touch what every invocation touches before the request arrives; returns
    an fd on /dev/null for the child's stdin once its request is read.

    A forked child pays a copy-on-write fault on the first write to each
    inherited page (reference counts make reads writes): ~150 of them on the
    runtime's own path. A dry run of that path here, before the request, takes
    them off the request's critical path: a jailed call's p50 went from 0.42
    to 0.24 ms when this covered the context, the flushes and the usage too.
    """
    _rehearse(fn)
    return os.open("/dev/null", os.O_RDONLY)


def _rehearse(fn: Handler) -> None:
    """The runtime's own part of an invocation, on dummy data. Nothing of the
    function runs, and a failure here changes nothing."""
    try:
        meta = {"method": "GET", "path": "/", "query_string": "a=1", "headers": [["a", "b"]]}
        nsfaas.Request(meta, b"")
        nsfaas.Context({"env": {"a": "b"}, "timeout_s": 1}, log_fd=LOG_FD, proxy_path=PROXY_SOCKET)
        value = nsfaas.to_response({"warm": [1, "x"]})
        hasattr(value, "__await__")
        callable(fn)
        _frames.check_lengths(1, 1, 1)
        _frames.PREFIX.unpack(_frames.PREFIX.pack(1, 1))
        frame = {"kind": "ok", "status": 200, "headers": [["a", "b"]], "usage": _usage()}
        _frames.encode(frame, b"x")
        _frames.decode_header(b'{"op": "invoke", "n": 1, "ctx": {}, "limits": {"cpu_s": 1}}')
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        resource.getrlimit(resource.RLIMIT_CPU)
    except Exception:  # an optimisation only: the request path reports any error
        pass


def _rehearse_in_zygote(fn: Handler) -> None:
    """Run the runtime's side of an invocation a few times in the zygote, on
    dummy data, before the first fork (warm workers only: a cold start forks
    once). CPython specialises a function's bytecode in place after a few calls
    and fills its caches on first use; done here once, no child writes (and
    copies) those pages again: ~40 fewer page faults per invocation. The
    paths a handler often takes (query, headers, ctx.log, other return types)
    are rehearsed too: they cost a child nothing unless it takes them.
    Nothing of the function runs here, and a failure changes nothing."""
    null = os.open("/dev/null", os.O_WRONLY)
    try:
        meta = {
            "method": "GET",
            "path": "/",
            "query_string": "a=1&b=%20",
            "headers": [["a", "b"]],
            "path_params": {"p": "1"},
        }
        for _ in range(16):
            _rehearse(fn)
            request = nsfaas.Request(meta, b"{}")
            request.query, request.headers.get("a"), request.path_params, request.json()
            ctx = nsfaas.Context({"timeout_s": 1}, log_fd=null, proxy_path=PROXY_SOCKET)
            ctx.log.info("warm", a=1)
            ctx.remaining_ms()
            for value in ("x", b"x", [1], ("x", 201), ("x", 200, {"a": "b"}), nsfaas.Response("x")):
                nsfaas.to_response(value)
    except Exception:
        pass
    finally:
        os.close(null)


def _usage() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_ms": (usage.ru_utime + usage.ru_stime + kids.ru_utime + kids.ru_stime) * 1000.0,
        "maxrss_kb": max(usage.ru_maxrss, kids.ru_maxrss),
    }


# A traceback is printed whole up to this size, then cut in the middle: an
# exception with a 5 MB message must be an `error`, not an `output_limit`.
TRACEBACK_CAP = 32 * 1024


def _print_exc() -> None:
    import traceback  # only on the error path

    text = traceback.format_exc()
    if len(text) > TRACEBACK_CAP:
        cut = len(text) - TRACEBACK_CAP
        half = TRACEBACK_CAP // 2
        text = f"{text[:half]}\n[... {cut} characters cut ...]\n{text[-half:]}"
    # A text stream cannot retry a partial write to a non-blocking fd (the
    # function's own doing, on the error path only): the traceback would be lost.
    try:
        os.set_blocking(2, True)
    except OSError:
        pass
    sys.stderr.write(text)


def _text(exc: BaseException) -> str:
    """``str(exc)``, capped; an exception whose __str__ fails is still reported."""
    try:
        return str(exc)[:2000]
    except BaseException:
        return f"<{type(exc).__name__}: str() failed>"


def _finish(frame: dict[str, Any], body: bytes) -> None:
    if os.getpid() != _handler_pid:
        return  # a fork of the handler came back here: only the handler answers
    for stream in (sys.stdout, sys.stderr):
        try:
            _flush(stream)
        except BaseException:
            pass
    # Everything logged is in its pipe before the result: the gateway answers
    # on the whole result frame, without waiting for this process's exit
    # (tearing down its address space is off the critical path).
    frame["usage"] = _usage()
    _frames.write_all(RESULT_FD, _frames.encode(frame, body))
    os.close(RESULT_FD)


def _flush(stream: Any) -> None:
    """``stream.flush()``, also when the function made its fd non-blocking:
    a buffered stream keeps what EAGAIN left, so wait until the gateway has
    read some and go on (its deadline bounds the wait)."""
    while True:
        try:
            stream.flush()
            return
        except BlockingIOError:
            _frames.wait_writable(stream.fileno())


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
    # asyncio's "Using selector: EpollSelector", once per async call, is the
    # runtime's doing, not the function's: a line in every record otherwise.
    logging.getLogger("asyncio").setLevel(logging.INFO)


class Child:
    """A pre-forked child waiting on its stdin for one request.

    Forking happens after the previous invocation (or right after start-up),
    off the request's critical path.
    """

    def __init__(self, fn: Handler, max_body: int, ends: list[int], n: int) -> None:
        pid = os.fork()
        if pid == 0:
            for target, fd in zip((0, 1, 2, LOG_FD, RESULT_FD), ends, strict=True):
                os.dup2(fd, target)
            os.closerange(LOG_FD + 1, MAX_FD)  # the control channel above all
            if _thread._count():
                _fresh_stdio()
            run_child(fn, max_body, n)
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)

    def reap(self) -> dict[str, Any]:
        """Wait for the child, clean up after it, and say how it ended."""
        _, status, rusage = os.wait4(self.pid, 0)
        os.close(self.pidfd)
        _kill_stragglers()
        return {
            "op": "exited",
            "exit_code": os.waitstatus_to_exitcode(status),
            "cpu_ms": (rusage.ru_utime + rusage.ru_stime) * 1000.0,
            "maxrss_kb": rusage.ru_maxrss,
        }


class Inbox:
    """Frames from the gateway on the control socket: ``channels`` (once, with
    the jail's ends of the children's channels as SCM_RIGHTS), ``cancel`` (n)
    and ``exit``."""

    def __init__(self, ctl: int) -> None:
        self.sock = _socket.socket(fileno=ctl)
        self.buf = b""
        self.fds: list[int] = []

    def receive(self) -> list[dict[str, Any]]:
        """One read (blocking); the whole frames it completed. EOFError at the end."""
        data, ancillary, _flags, _ = self.sock.recvmsg(65536, _socket.CMSG_SPACE(8 * 4))
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                count = len(payload) // 4
                self.fds += struct.unpack(f"{count}i", payload[: count * 4])
        if not data:
            raise EOFError
        self.buf += data
        frames = []
        while len(self.buf) >= _frames.PREFIX.size:
            hlen, blen = _frames.PREFIX.unpack_from(self.buf)
            size = _frames.PREFIX.size + hlen + blen
            if len(self.buf) < size:
                break
            frames.append(_frames.decode_header(self.buf[_frames.PREFIX.size : size - blen]))
            self.buf = self.buf[size:]
        return frames

    def channels(self) -> list[int]:
        """The children's channels, in the order of a child's fds 0, 1, 2, 4, 3:
        stdin (a socket), stdout, stderr, ctx.log lines, the result (pipes)."""
        while True:
            for header in self.receive():
                if header.get("op") == "channels" and len(self.fds) == 5:
                    return self.fds
                raise EOFError  # anything else first: the gateway gave up


class Channels:
    """The file status of a warm worker's output channels (a child's fds 1-4),
    as the gateway made them, put back before each child is forked.

    Every child gets the same pipes, and what fcntl sets on them belongs to
    the pipe, not to the child: one invocation's O_NONBLOCK failed the next
    one's output with a 500, and a pipe size, SIGIO owner or signal it chose
    was a few bits for the next one to read."""

    def __init__(self, fds: list[int]) -> None:
        import fcntl  # warm jails only: a cold start never imports it

        self.fcntl = fcntl.fcntl
        # (get, set) pairs: status flags (O_NONBLOCK, O_APPEND, O_DIRECT,
        # O_ASYNC), pipe size, SIGIO owner, SIGIO signal.
        self.knobs = [
            (fcntl.F_GETFL, fcntl.F_SETFL),
            (fcntl.F_GETPIPE_SZ, fcntl.F_SETPIPE_SZ),
            (fcntl.F_GETOWN, fcntl.F_SETOWN),
            (fcntl.F_GETSIG, fcntl.F_SETSIG),
        ]
        self.fresh = [(fd, [self.fcntl(fd, get) for get, _ in self.knobs]) for fd in fds]

    def restore(self) -> bool:
        """One fcntl call a knob when nothing changed (16 in all, ~5 us).
        False if a channel cannot be put back (the worker then retires)."""
        try:
            for fd, values in self.fresh:
                for (get, put), value in zip(self.knobs, values, strict=True):
                    if self.fcntl(fd, get) != value and not self._put(fd, put, value):
                        return False
        except OSError:
            return False
        return True

    def _put(self, fd: int, put: int, value: int) -> bool:
        # Shrinking a pipe that holds more than the new size fails (EBUSY)
        # until the gateway has read it: it reads all the time, so wait a bit.
        deadline = time.monotonic() + 0.5
        while True:
            try:
                self.fcntl(fd, put, value)
                return True
            except OSError as exc:
                if exc.errno != 16 or time.monotonic() > deadline:  # EBUSY
                    return False
            time.sleep(0.001)


def _fresh_stdio() -> None:
    """New sys.stdout/sys.stderr for a child of a zygote whose module started
    threads. Threads do not survive fork, but a lock one of them held does:
    a child that flushed the inherited stream would wait on it forever."""
    import io

    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        raw = io.FileIO(fd, "w", closefd=False)
        new = io.TextIOWrapper(
            io.BufferedWriter(raw),
            encoding=old.encoding,
            errors=old.errors,
            line_buffering=old.line_buffering,
        )
        setattr(sys, name, new)


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


# /tmp itself as the jail started (mode, atime/mtime, inode flags, xattrs),
# read before the import; None outside a warm jail's pid 1.
_tmp_fresh: tuple[int, int, int, int, dict[str, bytes]] | None = None
_tmp_fd = -1  # /tmp, held by the zygote for its inode flags (closed in every child)
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602


def _remember_tmp(path: str = "/tmp") -> None:
    global _tmp_fresh, _tmp_free
    if os.getpid() != 1:
        return
    st = os.stat(path)
    xattrs = {name: os.getxattr(path, name) for name in os.listxattr(path)}
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = _inode_flags(fd)
    finally:
        os.close(fd)
    _tmp_fresh = (st.st_mode & 0o7777, st.st_atime_ns, st.st_mtime_ns, flags, xattrs)
    _tmp_free = _free_space(path)


_tmp_free: tuple[int, int] | None = None  # /tmp's free blocks and inodes when fresh
# An unlinked /tmp file can outlive every process of an invocation: its fd
# sent (SCM_RIGHTS) into a Unix socket's own queue stays in flight, a
# reference cycle, until the kernel's garbage collection of such sockets runs,
# 0.1-1 s later. Its space is then not the next invocation's.
_TMP_SETTLE_S = 0.2


def _free_space(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bfree, st.f_ffree


def _inode_flags(fd: int, new: int | None = None) -> int:
    """The inode flags of ``fd`` (chattr: its owner may set nodump and
    noatime), set to ``new`` first if given; -1 where the file system has none."""
    import fcntl  # warm jails only: a cold start never imports it

    buf = bytearray(8)
    try:
        if new is not None:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, new.to_bytes(8, "little"))
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    except OSError as exc:
        if new is None and exc.errno in (25, 95):  # ENOTTY, EOPNOTSUPP
            return -1
        raise
    return int.from_bytes(buf[:4], "little")


def _reset_tmp(path: str) -> None:
    """Give /tmp itself the metadata it had when the jail started. The
    function owns it, so its xattrs (64 KiB a name), mode (`chmod 0500` broke
    every later call on the worker) and inode flags would otherwise reach the
    next invocation. Times are _wipe_tmp's, after its listing. OSError if any
    of it fails. Three syscalls when nothing changed."""
    global _tmp_fd
    assert _tmp_fresh is not None
    mode, _, _, flags, xattrs = _tmp_fresh
    for name in os.listxattr(path):
        if name not in xattrs:
            os.removexattr(path, name)  # an ACL too: before the mode
    for name, value in xattrs.items():
        if os.getxattr(path, name) != value:
            os.setxattr(path, name, value)
    if os.stat(path).st_mode & 0o7777 != mode:
        os.chmod(path, mode)
    if flags >= 0:
        if _tmp_fd < 0:  # opened after the import, so never one of fds 0-4
            _tmp_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if _inode_flags(_tmp_fd) != flags:
            _inode_flags(_tmp_fd, flags)


def _wipe_tmp(path: str = "/tmp") -> bool:
    """Between warm invocations, leave /tmp as a fresh jail's: empty, and the
    directory's own mode, xattrs, flags and times as they were at the start
    (``_reset_tmp``). False if something is left or cannot be reset (the
    worker then retires rather than show it to the next invocation).

    Walks by relative names from inside each directory (chdir), so a tree
    deeper than PATH_MAX is no obstacle, and without recursion, so depth is
    none either; the walk is bounded by the /tmp inode cap it can meet.
    """
    if os.getpid() != 1:
        return True  # not a jail's pid 1 (a bare run on a host): the host's /tmp is not ours
    if _tmp_fresh is None:
        return False  # what a fresh /tmp looks like could not be read
    try:
        _reset_tmp(path)
        if os.listdir(path) and not _empty_tmp(path):
            return False
        if _tmp_free is not None and _free_space(path) != _tmp_free:
            deadline = time.monotonic() + _TMP_SETTLE_S
            while _free_space(path) != _tmp_free:
                if time.monotonic() > deadline:
                    return False  # held elsewhere: the next invocation would not get it
                time.sleep(0.01)
        # Last: listing /tmp (or emptying it) moved its times.
        os.utime(path, ns=(_tmp_fresh[1], _tmp_fresh[2]))
        return True
    except OSError:
        return False


def _empty_tmp(path: str) -> bool:
    """Delete everything under ``path``; True if it is empty then."""
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir(path)
        names: list[str] = []  # the directories entered, innermost last
        for _ in range(1 << 16):  # ~ a few steps per inode; never endless
            descended = False
            with os.scandir(".") as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            os.chmod(entry.name, 0o700)  # one the function made unsearchable
                            os.chdir(entry.name)
                            names.append(entry.name)
                            descended = True
                            break
                        os.unlink(entry.name)
                    except OSError:
                        pass
            if descended:
                continue
            if not names:
                break
            os.chdir("..")
            try:
                os.rmdir(names.pop())
            except OSError:
                return False  # it would be entered again and again
        os.chdir(path)
        return not os.listdir(".")
    except OSError:
        return False
    finally:
        os.fchdir(here)
        os.close(here)


def _sysconf_without_sysinfo() -> None:
    """os.sysconf raises OSError(ENOSYS) for SC_PHYS_PAGES and SC_AVPHYS_PAGES.

    Seccomp refuses sysinfo (host-wide thread count, load and free memory: a
    channel between tenants), and glibc's sysconf ignores that failure and
    computes both from an uninitialised struct: a huge negative number. An
    error is the truthful answer. (C code calling sysconf itself still gets
    glibc's number; nothing in CPython's stdlib asks for these two.)
    """
    real = os.sysconf
    names = os.sysconf_names
    refused = {names[n] for n in ("SC_PHYS_PAGES", "SC_AVPHYS_PAGES") if n in names}

    def sysconf(name: str | int, /) -> int:
        if (names.get(name) if isinstance(name, str) else name) in refused:
            raise OSError(38, "sysinfo is not available in the jail")  # ENOSYS
        return real(name)

    sysconf.__doc__ = real.__doc__
    os.sysconf = sysconf


def main(argv: list[str]) -> int:
    # pid 1 of a pid namespace only receives the signals it has a handler for;
    # Python's own SIGINT handler would let a child kill(1, SIGINT) the zygote.
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    _sysconf_without_sysinfo()
    # Hard too, before any of the function's code: no process of the jail can
    # raise it again (RLIMIT_SIGPENDING is not one of nsjail's rlimit options).
    resource.setrlimit(resource.RLIMIT_SIGPENDING, (SIGPENDING, SIGPENDING))
    ctl = int(argv[1])
    entrypoint = argv[2]
    once = argv[3] == "once"
    max_body = int(argv[4])
    # The function's view, the same warm and cold: no runtime internals (a
    # library that parses sys.argv at import would take them for options).
    sys.argv[:] = [""]
    # A pipe makes stdout block-buffered: what a call printed before a timeout,
    # an OOM or os._exit was lost with the buffer, and the rest came late,
    # after later ctx.log lines. Line by line, as a terminal would have it.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if not once:
        try:
            _remember_tmp()  # before the import can change it
        except OSError:
            pass  # unknown, so never reset: the worker serves one invocation
    # The runtime is up: whatever ends it from here on is the function's import.
    _frames.write_all(ctl, _frames.encode({"op": "loading"}))
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
        err = {
            "op": "load_error",
            "error_type": type(exc).__name__[:200],
            "message": str(exc)[:2000],
        }
        _frames.write_all(ctl, _frames.encode(err))
        _wait_for_eof(ctl)
        return 1
    if not once:
        _rehearse_in_zygote(fn)
    sys.stdout.flush()
    sys.stderr.flush()
    # Move everything imported so far out of the collector's reach: a child's
    # GC pass would otherwise touch (and copy) every page it inherited.
    import gc

    gc.freeze()
    _reserve_low_fds()
    inbox = Inbox(ctl)
    try:
        ends = inbox.channels()
    except (EOFError, _frames.FrameError, OSError):
        return 0
    ready: dict[str, Any] = {"op": "ready"}
    channels = None if once else Channels(ends[1:])
    if not once:
        # What the import left in /tmp is not the first invocation's to see
        # (nor to change under a mapping the import made of it): every warm
        # invocation starts with /tmp empty.
        if not _wipe_tmp():
            ready["single_use"] = "/tmp could not be emptied after the import"
        # A thread the import left running stays in this process, sees each
        # invocation's /tmp and could hand it to every later child: such a
        # worker serves one invocation, like a cold jail.
        elif _thread._count():
            ready["single_use"] = "the module left threads running at import"
    n = 1
    first = Child(fn, max_body, ends, n)
    _frames.write_all(ctl, _frames.encode(ready))
    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    poller.register(first.pidfd, select.POLLIN)
    child: Child | None = first
    while True:
        for fd, _ev in poller.poll():
            if fd == ctl:
                try:
                    frames = inbox.receive()
                except (EOFError, _frames.FrameError, OSError):
                    return 0
                for header in frames:
                    op = header.get("op")
                    if op == "cancel" and child is not None and header.get("n") == n:
                        # The gateway's deadline passed (or the child outlived
                        # its answer): the child dies, this worker stays.
                        os.kill(child.pid, SIGKILL)
                    elif op == "exit":
                        return 0
            elif child is not None and fd == child.pidfd:
                poller.unregister(child.pidfd)
                exited = child.reap()
                exited["n"] = n
                clean = once or _wipe_tmp()
                if not clean:
                    exited["retire"] = "/tmp could not be emptied"
                elif channels is not None and not channels.restore():
                    clean = False
                    exited["retire"] = "the output channels could not be reset"
                # The gateway writes the next request only after this frame.
                _frames.write_all(ctl, _frames.encode(exited))
                child = None
                if not clean:
                    return 0
                if not once:
                    n += 1
                    child = Child(fn, max_body, ends, n)
                    poller.register(child.pidfd, select.POLLIN)


def _reserve_low_fds() -> None:
    """Keep every fd up to LOG_FD taken, so pipes received later never get a
    number a child's dup2 onto 0-4 would overwrite before using it."""
    while True:
        fd = os.open("/dev/null", os.O_RDONLY)
        if fd > LOG_FD:
            os.close(fd)
            return


def _wait_for_eof(fd: int) -> None:
    """Stay alive until the gateway has read our answer and hangs up."""
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
