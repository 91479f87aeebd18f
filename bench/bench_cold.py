"""Cold start: a fresh jail per invocation against the same runtime started bare.

    .venv/bin/python bench/bench_cold.py [-n 40] [--warmup 3] [--uid 61999]

Each round runs, in alternating order (so drift and caches hit both alike):

  jail   ``JailRunner.run``: nsjail + namespaces + cgroups + the runtime bootstrap,
         one hello invocation, jail torn down and reaped (the product's cold path).
  bare   the same interpreter (the runner's ``config.interpreter.exe``) running the
         same ``bootstrap.py`` with the same flags (``-I -S -B``), the same handler and
         the same fd protocol (ready / invoke / done frames on a socketpair), outside
         any jail: spawn -> ready -> invoke -> done -> EOF -> exit, as the jail does.
  python ``python3 -I -S -c pass`` of the same interpreter, for scale.

The bare run drops to an otherwise unused uid (``--uid``): the runtime ends every
invocation with ``kill(-1, SIGKILL)``, which inside a jail means "everything in this
pid namespace" but on the host, as root, would mean every process on the machine.
As a uid that owns nothing else it can only hit its own children. The uid is dropped
with ``setpriv`` when present (a helper that execs the interpreter, as nsjail does),
else with subprocess's ``user=``.

Prints median and p90 of each, and the median of the per-round jail/bare ratios
(issue 2's target: at most 1.5x).
"""

from __future__ import annotations

import argparse
import asyncio
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
from jail.runner import RUNTIME_SRC
from jail.runtime import _frames

HELLO = "def handler(request, ctx):\n    return {'hello': request.query.get('name', 'world')}\n"
EXPECTED = b'{"hello": "bench"}'
MAX_BODY = 6 << 20


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def invocation(i: int) -> Invocation:
    return Invocation(
        invocation_id=f"bench-{i}", function="hello", version=1, tenant="bench",
        query_string="name=bench",
    )


def make_code(root: Path) -> Path:
    code = root / "code" / "bench-hello"
    code.mkdir(parents=True, exist_ok=True)
    os.chmod(code, 0o755)  # noqa: S103 (the jail uid reads it)
    (code / "handler.py").write_text(HELLO)
    os.chmod(code / "handler.py", 0o644)
    return code


def make_bare_dir(root: Path) -> Path:
    """bootstrap.py, _frames.py, nsfaas.py (the SDK) and handler.py in one folder:
    the bootstrap puts its own folder first on sys.path, so it imports the handler
    from there (it also adds /function, which does not exist on the host)."""
    bare = root / "bare"
    bare.mkdir()
    for src, dst in (("bootstrap.py", "bootstrap.py"), ("_frames.py", "_frames.py"),
                     ("sdk.py", "nsfaas.py")):
        shutil.copyfile(RUNTIME_SRC / src, bare / dst)
    (bare / "handler.py").write_text(HELLO)
    for p in bare.iterdir():
        os.chmod(p, 0o644)
    os.chmod(bare, 0o755)  # noqa: S103 (read by the unprivileged uid)
    return bare


def check_uid_unused(uid: int) -> None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}")
            except OSError:
                continue
            if st.st_uid == uid:
                sys.exit(f"uid {uid} owns process {entry}; pick an unused one with --uid")


async def run_jail(runner: JailRunner, spec: JailSpec, i: int) -> float:
    t0 = time.perf_counter()
    result = await runner.run(spec, invocation(i))
    dt = (time.perf_counter() - t0) * 1000
    if result.outcome != "ok" or result.body != EXPECTED:
        raise SystemExit(f"jail run failed: {result.outcome} {result.error_message}")
    return dt


async def run_bare(exe: str, bare: Path, spec: JailSpec, uid: int, i: int) -> float:
    """The worker protocol (jail/worker.py) against a bootstrap outside any jail."""
    host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = child.fileno()
    t0 = time.perf_counter()
    argv = [exe, "-I", "-S", "-B", str(bare / "bootstrap.py"), str(fd), "handler:handler",
            "once", str(MAX_BODY)]
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
    child.close()
    reader, writer = await asyncio.open_unix_connection(sock=host)

    async def frame() -> tuple[dict[str, object], bytes]:
        hlen, blen = _frames.PREFIX.unpack(await reader.readexactly(_frames.PREFIX.size))
        header = _frames.decode_header(await reader.readexactly(hlen))
        return header, await reader.readexactly(blen) if blen else b""

    try:
        header, _ = await frame()
        assert header.get("op") == "ready", header
        writer.write(_frames.encode(invocation(i).frame_header(spec), b""))
        await writer.drain()
        while True:
            header, body = await frame()
            if header.get("op") == "done":
                break
        writer.close()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        writer.close()
    dt = (time.perf_counter() - t0) * 1000
    # The done frame carries the child's own result frame: header, then the body.
    hlen, _blen = _frames.PREFIX.unpack(body[: _frames.PREFIX.size])
    if body[_frames.PREFIX.size + hlen :] != EXPECTED:
        raise SystemExit(f"bare run failed: {header} {body!r}")
    return dt


async def run_python(exe: str) -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(exe, "-I", "-S", "-c", "pass")
    await proc.wait()
    return (time.perf_counter() - t0) * 1000


def summary(name: str, values: list[float]) -> str:
    return (f"{name:<8} {statistics.median(values):8.2f} {pct(values, 90):8.2f} "
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
    try:
        runner = await asyncio.to_thread(JailRunner.create, jail_dir=root / "jail")
        code = make_code(runner.jail_dir)
        bare = make_bare_dir(root)
        exe = runner.config.interpreter.exe
        spec = runner.spec(code, "handler:handler", Limits(timeout_s=10))
        jail_ms: list[float] = []
        bare_ms: list[float] = []
        py_ms: list[float] = []
        for i in range(args.warmup + args.n):
            order = ("jail", "bare") if i % 2 else ("bare", "jail")
            got = {}
            for kind in order:
                if kind == "jail":
                    got[kind] = await run_jail(runner, spec, i)
                else:
                    got[kind] = await run_bare(exe, bare, spec, args.uid, i)
            p = await run_python(exe)
            if i >= args.warmup:
                jail_ms.append(got["jail"])
                bare_ms.append(got["bare"])
                py_ms.append(p)
        ratios = [j / b for j, b in zip(jail_ms, bare_ms, strict=True)]
        print(f"cold start, {args.n} interleaved rounds, interpreter {exe} "
              f"(Python {runner.config.interpreter.version}), {os.cpu_count()} CPUs")
        print(f"cgroups v{runner.config.cgroups.version}, nsjail {runner.config.nsjail}; "
              f"bare runs as uid {args.uid} via "
              f"{'setpriv' if shutil.which('setpriv') else 'subprocess user='}")
        print()
        print(f"{'ms':<8} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
        print(summary("jail", jail_ms))
        print(summary("bare", bare_ms))
        print(summary("python", py_ms))
        print()
        print(f"jail/bare: median of per-round ratios {statistics.median(ratios):.2f}x "
              f"(p90 {pct(ratios, 90):.2f}x); ratio of medians "
              f"{statistics.median(jail_ms) / statistics.median(bare_ms):.2f}x  [target <= 1.5x]")
        extra = statistics.median(jail_ms) - statistics.median(bare_ms)
        print(f"jail - bare (median): {extra:.2f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
