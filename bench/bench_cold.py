"""Cold start: a fresh jail per invocation against the same runtime started bare.

    .venv/bin/python bench/bench_cold.py [-n 40] [--warmup 3] [--uid 61999]

Each round runs, in alternating order (so drift and caches hit both alike):

  jail   ``JailRunner.run``: nsjail + namespaces + cgroups + the runtime bootstrap,
         one hello invocation (the product's cold path).
  bare   the same interpreter (the runner's ``config.interpreter.exe``) running the
         same bootstrap with the same arguments as the jail's command line (taken
         from ``build_command``, with the runtime's jail path replaced by a host
         folder), the same installed runtime files (bytecode included), the same
         handler and the same fd protocol (channels in and ready out on a
         socketpair, the request into the child's stdin socket, the result from
         its pipe), outside any jail.
  python ``python3 -I -S -c pass`` of the same interpreter, for scale.

Two times per run: to the **answer** (spawn until the whole result frame; what a caller
waits for: ``JailRunner.run`` returns there and tears the jail down in the
background) and to **teardown** (until the process is reaped; for the jail, until
``runner.settle()`` returns). Prints median, p90, min and max of each and the median
of the per-round jail/bare ratios (issue 2's target: at most 1.5x).

The bare run drops to an otherwise unused uid (``--uid``): the runtime ends every
invocation with ``kill(-1, SIGKILL)``, which inside a jail means "everything in this
pid namespace" but on the host, as root, would mean every process on the machine.
As a uid that owns nothing else it can only hit its own children. The uid is dropped
with ``setpriv`` when present (a helper that execs the interpreter, as nsjail does),
else with subprocess's ``user=``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import inspect
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jail import Invocation, JailRunner, JailSpec, Limits
from jail import command as jail_command
from jail.runtime import _frames
from jail.worker import _make_channels

HELLO = "def handler(request, ctx):\n    return {'hello': request.query.get('name', 'world')}\n"
EXPECTED = b'{"hello": "bench"}'
FD = 100  # the control fd number on both command lines


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def invocation(i: int) -> Invocation:
    return Invocation(
        invocation_id=f"bench-{i}", function="hello", version=1, tenant="bench",
        query_string="name=bench",
    )


def make_code(runner: JailRunner) -> Path:
    """The handler as the product stores it (``ensure_code``: precompiled if it does)."""

    def write(path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.mkdir(parents=True)
        os.chmod(tmp, 0o755)  # noqa: S103 (the jail uid reads it)
        (tmp / "handler.py").write_text(HELLO)
        os.chmod(tmp / "handler.py", 0o644)
        tmp.rename(path)

    return runner.ensure_code("bench-hello", write)


def make_bare_dir(root: Path, runner: JailRunner, code: Path) -> Path:
    """The installed runtime folder (as the jail mounts it, __pycache__ included)
    plus the handler and its bytecode, in one host folder. The bootstrap puts its
    own folder first on sys.path, so it finds the handler there (it also adds
    /function, which does not exist on the host)."""
    bare = root / "bare"
    shutil.copytree(runner.config.runtime_dir, bare)
    shutil.copyfile(code / "handler.py", bare / "handler.py")
    if (code / "__pycache__").is_dir():
        (bare / "__pycache__").mkdir(exist_ok=True)
        for pyc in (code / "__pycache__").iterdir():
            shutil.copyfile(pyc, bare / "__pycache__" / pyc.name)
    for dirpath, _dirnames, filenames in os.walk(bare):
        os.chmod(dirpath, 0o755)  # noqa: S103 (read by the unprivileged uid)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    return bare


def bare_argv(runner: JailRunner, spec: JailSpec, bare: Path, fd: int) -> list[str]:
    """What the jail's command runs after nsjail's ``--``, pointed at ``bare``."""
    build = jail_command.build_command
    kw: dict[str, Any] = {"ctl_fd": fd, "log_fd": fd}
    if "cgroup_procs" in inspect.signature(build).parameters:
        kw["cgroup_procs"] = [Path("/dev/null")] * 3
    if getattr(runner.config, "per_jail_uid", False):
        kw["uid"] = 65534  # only the argv after nsjail's "--" is used
    cmd = build(runner.config, spec, **kw)
    tail = cmd[len(cmd) - cmd[::-1].index("--") :]
    runtime_dst = getattr(jail_command, "RUNTIME_DST", "/opt/nsfaas")
    return [runner.config.interpreter.exe, *(a.replace(runtime_dst, str(bare)) for a in tail[1:])]


def check_uid_unused(uid: int) -> None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}")
            except OSError:
                continue
            if st.st_uid == uid:
                sys.exit(f"uid {uid} owns process {entry}; pick an unused one with --uid")


async def run_jail(runner: JailRunner, spec: JailSpec, i: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    result = await runner.run(spec, invocation(i))
    answer = (time.perf_counter() - t0) * 1000
    await runner.settle()  # the teardown JailRunner.run leaves to a background task
    done = (time.perf_counter() - t0) * 1000
    if result.outcome != "ok" or result.body != EXPECTED:
        raise SystemExit(f"jail run failed: {result.outcome} {result.error_message}")
    return answer, done


async def run_bare(argv: list[str], bare: Path, spec: JailSpec, uid: int, i: int) -> tuple[
    float, float
]:
    """The worker protocol (jail/worker.py) against a bootstrap outside any jail."""
    host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.dup2(child.fileno(), FD)  # the fd number the command line names
    child.close()
    t0 = time.perf_counter()
    setpriv = shutil.which("setpriv")
    drop: dict[str, Any] = {}
    if setpriv:
        # Like nsjail: a small helper is spawned (vfork) and execs the interpreter.
        argv = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]
    else:
        drop = {"user": uid, "group": uid, "extra_groups": []}  # forces fork over vfork
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=str(bare), env={}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        pass_fds=(fd,), start_new_session=True, **drop,
    )
    os.close(fd)
    loop = asyncio.get_running_loop()
    stdin, outputs, theirs = _make_channels()  # as Worker does: a socket, four pipes
    host.sendmsg([_frames.encode({"op": "channels"})],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", theirs))])
    for end in theirs:
        os.close(end)
    reader, writer = await asyncio.open_unix_connection(sock=host)

    async def readable(fd: int) -> None:
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fd)

    try:
        header = {"op": "loading"}
        while header.get("op") == "loading":  # then "ready", as the gateway reads them
            hlen, _ = _frames.PREFIX.unpack(await reader.readexactly(_frames.PREFIX.size))
            header = _frames.decode_header(await reader.readexactly(hlen))
        assert header.get("op") == "ready", header
        request = {**invocation(i).frame_header(spec), "n": 1}
        stdin.send(_frames.encode(request, b""))
        result = b""
        size = 0
        while not size or len(result) < size:
            await readable(outputs[3])
            result += os.read(outputs[3], 65536)
            if not size and len(result) >= _frames.PREFIX.size:
                hlen, blen = _frames.PREFIX.unpack_from(result)
                size = _frames.PREFIX.size + hlen + blen
        answer = (time.perf_counter() - t0) * 1000
        writer.close()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        writer.close()
        stdin.close()
        for end in outputs:
            os.close(end)
    done = (time.perf_counter() - t0) * 1000
    hlen, _blen = _frames.PREFIX.unpack(result[: _frames.PREFIX.size])
    if result[_frames.PREFIX.size + hlen :] != EXPECTED:
        raise SystemExit(f"bare run failed: {result!r}")
    return answer, done


async def run_python(exe: str) -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(exe, "-I", "-S", "-c", "pass")
    await proc.wait()
    return (time.perf_counter() - t0) * 1000


def summary(name: str, values: list[float]) -> str:
    return (f"{name:<22} {statistics.median(values):8.2f} {pct(values, 90):8.2f} "
            f"{min(values):8.2f} {max(values):8.2f}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=40, help="paired rounds (default 40)")
    ap.add_argument("--warmup", type=int, default=3, help="unrecorded rounds first")
    ap.add_argument("--uid", type=int, default=61999, help="unused uid for the bare runs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: nsjail needs namespaces and cgroups")
    check_uid_unused(args.uid)

    root = Path(tempfile.mkdtemp(prefix="nsb-", dir="/tmp"))
    os.chmod(root, 0o711)  # noqa: S103 (the jail uid traverses it)
    runner: JailRunner | None = None
    try:
        runner = await asyncio.to_thread(JailRunner.create, jail_dir=root / "jail")
        code = await asyncio.to_thread(make_code, runner)
        bare = make_bare_dir(root, runner, code)
        exe = runner.config.interpreter.exe
        spec = runner.spec(code, "handler:handler", Limits(timeout_s=10))
        argv = bare_argv(runner, spec, bare, FD)
        times: dict[str, list[float]] = {k: [] for k in ("jail", "bare", "jail_td", "bare_td")}
        py_ms: list[float] = []
        for i in range(args.warmup + args.n):
            order = ("jail", "bare") if i % 2 else ("bare", "jail")
            got: dict[str, tuple[float, float]] = {}
            for kind in order:
                if kind == "jail":
                    got[kind] = await run_jail(runner, spec, i)
                else:
                    got[kind] = await run_bare(argv, bare, spec, args.uid, i)
            p = await run_python(exe)
            if i >= args.warmup:
                for kind in ("jail", "bare"):
                    times[kind].append(got[kind][0])
                    times[kind + "_td"].append(got[kind][1])
                py_ms.append(p)
        print(f"cold start, {args.n} interleaved rounds, interpreter {exe} "
              f"(Python {runner.config.interpreter.version}), {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"cgroups v{runner.config.cgroups.version}, nsjail {runner.config.nsjail}; "
              f"bare runs as uid {args.uid} via "
              f"{'setpriv' if shutil.which('setpriv') else 'subprocess user='}")
        print("bare command: " + " ".join(a if len(a) < 60 else repr(a) for a in argv))
        print()
        print(f"{'ms':<22} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
        print(summary("jail, to the answer", times["jail"]))
        print(summary("bare, to the answer", times["bare"]))
        print(summary("jail, to teardown", times["jail_td"]))
        print(summary("bare, to teardown", times["bare_td"]))
        print(summary("python3 -I -S -c pass", py_ms))
        print()
        for label, j, b in (("to the answer", times["jail"], times["bare"]),
                            ("to teardown", times["jail_td"], times["bare_td"])):
            ratios = [x / y for x, y in zip(j, b, strict=True)]
            print(f"jail/bare {label:<14} median of per-round ratios "
                  f"{statistics.median(ratios):.2f}x (p90 {pct(ratios, 90):.2f}x), ratio of "
                  f"medians {statistics.median(j) / statistics.median(b):.2f}x, difference "
                  f"{statistics.median(j) - statistics.median(b):+.2f} ms")
        print("target (issue 6): cold p50 <= 1.5x the bare start")
    finally:
        if runner is not None:
            await runner.aclose()  # background teardowns, spare launchers, cgroup slots
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
