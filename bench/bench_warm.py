"""Warm vs cold vs an in-process yardstick vs the fork floor, in one run (issue 6).

    .venv/bin/python bench/bench_warm.py [--duration 4] [--loadgen auto|wrk|httpx]

Same hello handler everywhere, same load generator, loopback only:

  (a) cold       the gateway (``nsfaas serve``) with NSFAAS_WARM=false: a new jail
                 per invocation.
  (b) warm       the gateway with warm workers on: a jailed, pre-imported zygote per
                 function forks a fresh child per invocation.
  (c) yardstick  the same handler as a plain in-process Starlette route under the
                 same uvicorn settings (no jail, no store, no logs).
  (b') warm-jail the warm path without HTTP, gateway, store or logs: ``Worker.invoke``
                 on warm workers (min(c, 8) of them) driven in-process. Not part of
                 the issue's four; it splits (b) into jail cost and gateway cost.
  (e) proto      the issue's throwaway prototype rebuilt (``bench/proto.py``): one jailed
                 stdlib-only Python forking a child per request behind the same kind of
                 Starlette route, with no per-invocation limits, record or logs. Not
                 one of the issue's four: it shows what the product's limits cost.
  (d) floor      fork + _exit + waitpid of a small Python process: a stdlib-only
                 ``python3 -I -S`` parent (the jail's interpreter) forking a child
                 that exits at once; at concurrency c, c such parents at once.

Reports p50/p99 latency and invocations/s at concurrency 1, 8 and 64 and the ratios
to (c); writes bench/results/warm.md and, with matplotlib, bench/results/warm.png.

Load generator: ``wrk`` when it is on PATH (``apt-get install -y wrk``), else an
async httpx client (much slower per request than wrk: it caps what the yardstick and
the warm path can show, so the table says which one ran). Each server runs as its
own process, one at a time, so nothing else of ours competes for the 2 CPUs.
Nothing here is needed by the tests or CI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
HELLO = "def handler(request, ctx):\n    return {'hello': request.query.get('name', 'world')}\n"
EXPECTED = {"hello": "world"}
CONCURRENCY = (1, 8, 64)
ADMIN = "bench-admin-key"
# Gateway settings for the run: enough warm workers and queue for concurrency 64.
GATEWAY_ENV = {
    "NSFAAS_MAX_CONCURRENCY": "16",
    "NSFAAS_FUNCTION_CONCURRENCY": "8",
    "NSFAAS_WARM_MAX_WORKERS": "8",
    "NSFAAS_QUEUE_SIZE": "256",
    "NSFAAS_QUEUE_TIMEOUT_S": "60",
}

FLOOR_SCRIPT = r"""
import json, os, sys, time
n = int(sys.argv[1])
lat = []
t_start = time.time()
for _ in range(n):
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    lat.append((time.perf_counter() - t0) * 1000.0)
print(json.dumps({"start": t_start, "end": time.time(), "lat": lat}))
"""


# -- the yardstick server (run as: bench_warm.py --yardstick PORT) -----------------------


def serve_yardstick(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from jail.runtime import sdk

    namespace: dict[str, Any] = {}
    exec(compile(HELLO, "handler.py", "exec"), namespace)  # noqa: S102 (our own constant)
    handler = namespace["handler"]

    async def hello(request: Request) -> Response:
        meta = {
            "method": request.method,
            "path": "/",
            "query_string": request.url.query,
            "headers": [[k, v] for k, v in request.headers.items()],
            "path_params": {},
        }
        body = await request.body()
        status, headers, payload = sdk.to_response(handler(sdk.Request(meta, body), None))
        resp = Response(payload, status_code=status)
        for k, v in headers:
            resp.headers[k] = v
        return resp

    app = Starlette(routes=[Route("/fn/hello", hello, methods=["GET", "POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, timeout_graceful_shutdown=15)


# -- servers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.05)
    raise SystemExit(f"server not ready:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def server(kind: str, workdir: Path) -> Iterator[str]:
    """Start one server process; yield the URL of its hello endpoint."""
    import httpx

    port = free_port()
    log = workdir / f"{kind}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSFAAS_")}
    if kind == "yardstick":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--yardstick", str(port)]
        health = f"http://127.0.0.1:{port}/fn/hello"
    elif kind == "proto":
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "proto.py"), str(port)]
        health = f"http://127.0.0.1:{port}/fn/hello"
    else:
        data = workdir / kind
        env.update(GATEWAY_ENV)
        env.update(
            NSFAAS_DATA_DIR=str(data), NSFAAS_HOST="127.0.0.1", NSFAAS_PORT=str(port),
            NSFAAS_ADMIN_KEY=ADMIN, NSFAAS_WARM="true" if kind == "warm" else "false",
        )
        cmd = [sys.executable, "-m", "gateway.cli", "serve"]
        health = f"http://127.0.0.1:{port}/healthz"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(health, proc, log)
        base = f"http://127.0.0.1:{port}"
        if kind not in ("yardstick", "proto"):
            r = httpx.put(f"{base}/api/v1/functions/hello", json={"source": HELLO, "public": True},
                          headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
            if r.status_code not in (200, 201):
                raise SystemExit(f"deploy failed: {r.status_code} {r.text}")
        r = httpx.get(f"{base}/fn/hello", timeout=30)
        if r.status_code != 200 or r.json() != EXPECTED:
            raise SystemExit(f"{kind}: unexpected answer {r.status_code} {r.text}")
        yield f"{base}/fn/hello"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- load generators -----------------------------------------------------------------------


@dataclass
class Cell:
    path: str
    conc: int
    p50_ms: float
    p99_ms: float
    rps: float
    requests: int
    errors: int = 0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _find(pattern: str, text: str) -> str:
    m = re.search(pattern, text, re.M)
    if m is None:
        raise ValueError(f"wrk output without {pattern!r}:\n{text}")
    return m.group(1)


def run_wrk(url: str, conc: int, duration: float) -> tuple[float, float, float, int, int]:
    threads = min(conc, 2)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{conc}", f"-d{max(1, round(duration))}s", "--timeout", "30s",
         "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout
    p50 = _ms(_find(r"^\s+50%\s+(\S+)", out))
    p99 = _ms(_find(r"^\s+99%\s+(\S+)", out))
    rps = float(_find(r"Requests/sec:\s+([\d.]+)", out))
    total = int(_find(r"(\d+) requests in", out))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    return p50, p99, rps, total, errors


async def _httpx_cell(url: str, conc: int, requests: int, max_s: float) -> tuple[
    list[float], float, int
]:
    import httpx

    lat: list[float] = []
    errors = 0
    left = requests
    deadline = time.perf_counter() + max_s
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal left, errors
            while left > 0 and time.perf_counter() < deadline:
                left -= 1
                t0 = time.perf_counter()
                r = await client.get(url)
                lat.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return lat, time.perf_counter() - t0, errors


def run_httpx(url: str, conc: int, duration: float) -> tuple[float, float, float, int, int]:
    requests = 400 if conc == 1 else 3000
    lat, elapsed, errors = asyncio.run(_httpx_cell(url, conc, requests, duration))
    return pct(lat, 50), pct(lat, 99), len(lat) / elapsed, len(lat), errors


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


# -- the fork floor ------------------------------------------------------------------------


def floor_cell(python: str, conc: int) -> Cell:
    per_parent = {1: 2000, 8: 400, 64: 60}.get(conc, 200)
    procs = [
        subprocess.Popen([python, "-I", "-S", "-c", FLOOR_SCRIPT, str(per_parent)],
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        for _ in range(conc)
    ]
    runs = []
    for p in procs:
        out, _ = p.communicate()
        runs.append(json.loads(out))
    lat = [x for r in runs for x in r["lat"]]
    elapsed = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return Cell("floor", conc, pct(lat, 50), pct(lat, 99), len(lat) / elapsed, len(lat))


# -- the warm path without HTTP -------------------------------------------------------------


class _FairPool:
    """Idle workers handed out first come, first served (asyncio.Queue lets a task
    that just put a worker back take it again at once, starving the others)."""

    def __init__(self) -> None:
        self.idle: collections.deque[Any] = collections.deque()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()

    async def get(self) -> Any:
        if self.idle and not self.waiters:
            return self.idle.popleft()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        return await fut

    def put(self, worker: Any) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(worker)
                return
        self.idle.append(worker)


async def _warm_jail_cell(runner: Any, spec: Any, conc: int, duration: float) -> Cell:
    from jail import Invocation, Worker

    pool = _FairPool()
    workers = [Worker(runner.config, spec) for _ in range(min(conc, 8))]
    await asyncio.gather(*(w.start() for w in workers))
    for w in workers:
        pool.put(w)
    lat: list[float] = []
    errors = 0
    seq = 0

    async def client(deadline: float) -> None:
        nonlocal errors, seq
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()  # waiting for a free worker counts, as it does over HTTP
            w = await pool.get()
            seq += 1
            inv = Invocation(invocation_id=f"b{seq}", function="hello", version=1, tenant="bench")
            r = await w.invoke(inv, start="warm")
            lat.append((time.perf_counter() - t0) * 1000)
            if r.outcome != "ok" or json.loads(r.body) != EXPECTED:
                errors += 1
            if not w.alive:
                await w.aclose(kill=True)
                w = Worker(runner.config, spec)
                workers.append(w)
                await w.start()
            pool.put(w)

    try:
        await client(time.perf_counter() + 0.5)  # warm-up
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(t0 + duration) for _ in range(conc)))
        elapsed = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(w.aclose(kill=True) for w in workers))
        settle = getattr(runner, "settle", None)
        if settle is not None:
            await settle()  # jails of closed workers gone before the next cell
    return Cell("warm-jail", conc, pct(lat, 50), pct(lat, 99), len(lat) / elapsed, len(lat),
                errors)


async def _warm_jail_cells(duration: float) -> list[Cell]:
    from bench_cold import make_code  # the same hello, stored as the product stores it

    from jail import JailRunner, Limits

    root = Path(tempfile.mkdtemp(prefix="nsbj-", dir="/tmp"))
    os.chmod(root, 0o711)  # noqa: S103 (the jail uid traverses it)
    runner: Any = None
    try:
        runner = await asyncio.to_thread(JailRunner.create, jail_dir=root / "jail")
        code = await asyncio.to_thread(make_code, runner)
        spec = runner.spec(code, "handler:handler", Limits(timeout_s=10), mode="warm")
        return [await _warm_jail_cell(runner, spec, c, duration) for c in CONCURRENCY]
    finally:
        if runner is not None:
            await runner.aclose()  # background teardowns, spare launchers, cgroup slots
        shutil.rmtree(root, ignore_errors=True)


# -- report --------------------------------------------------------------------------------

ORDER = ("cold", "warm", "warm-jail", "proto", "yardstick", "floor")


def table(cells: list[Cell]) -> str:
    yard = {c.conc: c for c in cells if c.path == "yardstick"}
    lines = [
        "| path | conc | p50 ms | p99 ms | inv/s | p50 / yardstick | inv/s / yardstick "
        "| p50 - yardstick ms | requests | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in ORDER:
        for c in sorted((c for c in cells if c.path == path), key=lambda c: c.conc):
            y = yard.get(c.conc)
            r50 = f"{c.p50_ms / y.p50_ms:.2f}x" if y else "-"
            rrps = f"{c.rps / y.rps:.3f}x" if y else "-"
            d50 = f"{c.p50_ms - y.p50_ms:+.2f}" if y else "-"
            lines.append(
                f"| {path} | {c.conc} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | {c.rps:,.0f} | {r50} "
                f"| {rrps} | {d50} | {c.requests} | {c.errors} |"
            )
    return "\n".join(lines)


def targets(cells: list[Cell]) -> list[str]:
    get = {(c.path, c.conc): c for c in cells}
    out = []
    w1, y1 = get.get(("warm", 1)), get.get(("yardstick", 1))
    if w1 and y1:
        d = w1.p50_ms - y1.p50_ms
        out.append(f"warm p50 at c=1 is {d:+.2f} ms vs the yardstick (target <= +1 ms): "
                   f"{'met' if d <= 1.0 else 'NOT met'}")
    w8 = get.get(("warm", 8))
    if w8:
        out.append(f"warm throughput at c=8 is {w8.rps:,.0f} inv/s (target >= 2,000): "
                   f"{'met' if w8.rps >= 2000 else 'NOT met'}")
    for conc in (1, 8):
        w, p = get.get(("warm", conc)), get.get(("proto", conc))
        if w and p:
            out.append(f"warm vs the prototype at c={conc}: p50 {w.p50_ms:.2f} vs "
                       f"{p.p50_ms:.2f} ms, {w.rps:,.0f} vs {p.rps:,.0f} inv/s "
                       f"({w.rps / p.rps:.2f}x)")
    return out


def plot(cells: list[Cell], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print('matplotlib is not installed: `.venv/bin/pip install -e ".[bench]"` for the PNG')
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    width = 0.13
    panels = (("p50_ms", "p50 latency (ms)"), ("p99_ms", "p99 latency (ms)"),
              ("rps", "invocations/s"))
    for ax, (attr, title) in zip(axes, panels, strict=True):
        for i, name in enumerate(ORDER):
            row = {c.conc: getattr(c, attr) for c in cells if c.path == name}
            xs = [j + (i - (len(ORDER) - 1) / 2) * width for j in range(len(CONCURRENCY))]
            ys = [row.get(conc, 0.0) for conc in CONCURRENCY]
            bars = ax.bar(xs, ys, width, label=name)
            ax.bar_label(bars, fmt="%.3g", fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(CONCURRENCY)), [f"c={c}" for c in CONCURRENCY])
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 4)  # room for the value labels
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("nsfaas hello: cold jail vs warm zygote vs in-process route vs fork floor")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per cell (wrk)")
    ap.add_argument("--loadgen", choices=("auto", "wrk", "httpx"), default="auto")
    ap.add_argument("--only", nargs="*", choices=ORDER, help="run only these paths")
    ap.add_argument("--yardstick", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.yardstick:
        serve_yardstick(args.yardstick)
        return
    if os.geteuid() != 0:
        sys.exit("run as root: the gateway needs namespaces and cgroups for nsjail")
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "httpx"
    load = run_wrk if loadgen == "wrk" else run_httpx

    from jail import _interp

    python = _interp.discover().exe
    paths = args.only or list(ORDER)
    workdir = Path(tempfile.mkdtemp(prefix="nsbw-", dir="/tmp"))
    cells: list[Cell] = []
    t_start = time.monotonic()
    try:
        for path in ORDER:
            if path not in paths:
                continue
            if path == "warm-jail":
                for cell in asyncio.run(_warm_jail_cells(args.duration)):
                    cells.append(cell)
                    print(f"  warm-jail c={cell.conc}: p50 {cell.p50_ms:.2f} ms "
                          f"{cell.rps:,.0f}/s errors {cell.errors}", flush=True)
                continue
            if path == "floor":
                for conc in CONCURRENCY:
                    cells.append(floor_cell(python, conc))
                    print(f"  floor c={conc}: p50 {cells[-1].p50_ms:.3f} ms", flush=True)
                continue
            with server(path, workdir) as url:
                load(url, 8, 1.0)  # warm-up: workers started, caches hot
                for conc in CONCURRENCY:
                    p50, p99, rps, total, errors = load(url, conc, args.duration)
                    cells.append(Cell(path, conc, p50, p99, rps, total, errors))
                    print(f"  {path} c={conc}: p50 {p50:.2f} ms p99 {p99:.2f} ms {rps:,.0f}/s"
                          f" errors {errors}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t_start

    import importlib.util

    import uvicorn

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    header = (
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at the end, "
        f"uvicorn {uvicorn.__version__} ({http}, {loop}) for every server, "
        f"load generator {loadgen}"
        + (f" ({args.duration:g} s per cell)" if loadgen == "wrk" else " (bounded counts)")
        + f", jail interpreter {python}, run took {elapsed:.0f} s"
    )
    settings = ", ".join(f"{k}={v}" for k, v in GATEWAY_ENV.items())
    md = [
        "# Warm path benchmark (`bench/bench_warm.py`)",
        "",
        header + ".",
        f"Gateway settings: {settings}.",
        "Ratios are to (c) the yardstick at the same concurrency; `errors` counts non-2xx "
        "answers and socket errors.",
        "",
        table(cells),
        "",
        *[f"- {t}" for t in targets(cells)],
        "",
    ]
    text = "\n".join(md)
    print()
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "warm.md").write_text(text)
    if plot(cells, RESULTS / "warm.png"):
        print(f"wrote {RESULTS / 'warm.md'} and {RESULTS / 'warm.png'}")
    else:
        print(f"wrote {RESULTS / 'warm.md'}")


if __name__ == "__main__":
    main()
