"""Soak: good and hostile functions together, for minutes, on a real gateway.

    .venv/bin/python bench/soak.py --duration 600        # the issue's 10 minutes
    .venv/bin/python bench/soak.py --duration 60         # a quick look

1. Starts `nsfaas serve` (warm path) as a subprocess on a free loopback port.
2. Measures the warm capacity of a small good function at concurrency 8.
3. Runs the good function alone at 80 % of that capacity (open loop) to get
   the baseline p99.
4. Runs it again for --duration seconds at the same rate while hostile
   functions (CPU loop, memory bomb, fork bomb, 100 MB of output) are called
   alongside, checking every good response byte for byte.
5. Samples the gateway's fds, threads, RSS, descendant processes and the
   jails' cgroup slots every few seconds and reports first/last/max.

Prints a table and exits non-zero if a good response was lost or wrong, if
the good p99 under hostile load exceeds 2x the baseline, or if a resource
grew past the stated bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rawhttp import HTTPError, RawClient  # bench/ is on the path (run as a script)

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "soak-admin-key"
GOOD = "def handler(request, ctx):\n    return {'echo': request.query.get('id')}\n"
HOSTILE = {
    "cpu-loop": ("def handler(r, c):\n    while True:\n        pass\n", 1.0, 64),
    "mem-bomb": (
        "def handler(r, c):\n    hog = []\n    while True:\n"
        "        hog.append(bytearray(1 << 20))\n",
        5.0,
        64,
    ),
    "fork-bomb": (
        "import os\ndef handler(r, c):\n    while True:\n        try:\n            os.fork()\n"
        "        except OSError:\n            pass\n",
        1.0,
        64,
    ),
    "huge-output": (
        "import sys\ndef handler(r, c):\n    line = 'x' * 1023 + '\\n'\n"
        "    for _ in range(100 * 1024):\n        sys.stdout.write(line)\n    return 'done'\n",
        10.0,
        64,
    ),
}
# Stated bounds on growth between the first and the last sample of the soak.
# fds: a live warm worker holds ~13 in the gateway (its control socket, nsjail's
# stdout, stderr and log pipes, two pidfds (the jail's pid 1 and the nsjail
# process, watched for its exit), its proxy socket, the five channels to its
# children) and each cgroup slot 2 (its counter files, kept open for reuse);
# the children bound (24, three processes per worker) allows ~8 more workers.
MAX_IN_FLIGHT = 128
BOUNDS = {"fds": 8 * 13 + 24 * 2, "threads": 8, "rss_mb": 64.0, "children": 24, "slots": 24}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> int:
    count, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        count += len(kids)
        todo += [int(k) for k in kids]
    return count


def sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    slots = 0
    for c in ("memory", "pids", "cpu"):
        base = Path("/sys/fs/cgroup") / c / "nsfaas"
        if base.exists():
            slots = max(slots, sum(1 for d in base.iterdir() if d.name.startswith("slot-")))
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"].strip()),
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "children": descendants(pid),
        "slots": slots,
    }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def deploy(c: httpx.AsyncClient, name: str, src: str, timeout_s: float, mem: int) -> None:
    r = await c.put(
        f"/api/v1/functions/{name}",
        json={"source": src, "public": True, "timeout_s": timeout_s, "memory_mb": mem},
    )
    r.raise_for_status()


async def capacity(c: RawClient, seconds: float) -> float:
    done = 0
    end = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        i = 0
        while time.monotonic() < end:
            i += 1
            r = await c.get(f"/fn/good?id={i}")
            if r.status == 200:
                done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(8)))
    return done / (time.monotonic() - t0)


async def open_loop(
    c: RawClient, rate: float, seconds: float, stats: dict[str, Any]
) -> None:
    """Fire good requests at a fixed rate, whatever the latency (open loop)."""
    tasks: set[asyncio.Task[None]] = set()
    # At most MAX_IN_FLIGHT are sent at once (more connections would only queue
    # in the gateway's listen backlog); latency still counts from each request's
    # scheduled time, so a stalled gateway cannot hide (no coordinated omission).
    gate = asyncio.Semaphore(MAX_IN_FLIGHT)
    interval = 1.0 / rate
    n = int(rate * seconds)
    start = time.monotonic()
    stats["t0"] = start

    async def one(i: int, t: float) -> None:
        what = ""
        try:
            async with gate:
                r = await c.get(f"/fn/good?id={i}")
            ok = r.status == 200 and json.loads(r.body) == {"echo": str(i)}
            what = f"{r.status} {r.headers.get('x-invocation-id', '-')} {r.body[:200]!r}"
        except (HTTPError, ValueError) as exc:
            ok = False
            what = f"{type(exc).__name__}: {exc}"
        lat = stats["lat"]
        assert isinstance(lat, list)
        ms = (time.monotonic() - t) * 1000
        lat.append(ms)
        calls = stats.setdefault("calls", [])
        assert isinstance(calls, list)
        calls.append((ms, t - start, ok, what))
        if not ok:
            stats["bad"] = int(stats["bad"]) + 1

    last = time.monotonic()
    for i in range(n):
        if time.monotonic() - last > 5:
            last = time.monotonic()
            lat = stats["lat"]
            assert isinstance(lat, list)
            print(f"  sent {i}, answered {len(lat)}, bad {stats['bad']}", file=sys.stderr)
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, start + i * interval))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        lat = stats["lat"]
        assert isinstance(lat, list)
        print(f"  draining: {len(tasks)} in flight, answered {len(lat)}", file=sys.stderr)
        await asyncio.wait(tasks, timeout=5)


async def hostile_loop(
    c: RawClient, stop: asyncio.Event, counts: dict[str, int],
    spans: list[tuple[str, float, float]], names: list[str],
) -> None:
    i = 0
    while not stop.is_set():
        name = names[i % len(names)]
        i += 1
        t0 = time.monotonic()
        try:
            r = await c.get(f"/fn/{name}")
            counts[f"{name}:{r.status}"] = counts.get(f"{name}:{r.status}", 0) + 1
        except HTTPError:
            counts[f"{name}:transport_error"] = counts.get(f"{name}:transport_error", 0) + 1
        spans.append((name, t0, time.monotonic()))


def by_overlap(
    calls: list[tuple[float, float, bool, str]], t0: float, spans: list[tuple[str, float, float]]
) -> list[str]:
    """The good calls' latency by which hostile functions ran while they did:
    which kind of hostile call the tail comes from."""
    spans = sorted(spans, key=lambda s: s[1])
    starts = [s[1] for s in spans]
    longest = max((b - a for _, a, b in spans), default=0.0)
    groups: dict[str, list[float]] = {}
    for ms, at, _, _ in calls:
        began, ended = t0 + at, t0 + at + ms / 1000
        lo = bisect.bisect_left(starts, began - longest)
        hi = bisect.bisect_right(starts, ended)
        names = sorted({n for n, a, b in spans[lo:hi] if a < ended and b > began})
        groups.setdefault("+".join(names) or "(none)", []).append(ms)
    return [
        f"  {k:40s} {len(v):7d} calls  p50 {pct(v, 0.5):7.1f}  p99 {pct(v, 0.99):8.1f} ms"
        for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    ]


def timeline(calls: list[tuple[float, float, bool, str]], every: float) -> list[str]:
    """The good calls' p99 per stretch of the run: whether the tail is spread
    over the run or comes in bursts."""
    buckets: dict[int, list[float]] = {}
    for ms, at, _, _ in calls:
        buckets.setdefault(int(at // every), []).append(ms)
    return [
        f"  {k * every:5.0f}s {len(v):6d} calls  p50 {pct(v, 0.5):7.1f}  p99 {pct(v, 0.99):8.1f}"
        f"  max {max(v):8.1f} ms"
        for k, v in sorted(buckets.items())
    ]


async def main(args: argparse.Namespace) -> int:
    data = Path(tempfile.mkdtemp(prefix="nsf-soak-", dir="/tmp"))
    port = free_port()
    env = {
        **os.environ,
        "NSFAAS_DATA_DIR": str(data),
        "NSFAAS_PORT": str(port),
        "NSFAAS_ADMIN_KEY": ADMIN,
        "NSFAAS_QUEUE_SIZE": "512",
        "NSFAAS_QUEUE_TIMEOUT_S": "30",
        "NSFAAS_FUNCTION_CONCURRENCY": "16",
    }
    log_file = (data / "gateway.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 (start-up of the system under test)
        [sys.executable, "-m", "gateway.cli", "serve"], cwd=ROOT, env=env,
        stdout=log_file, stderr=subprocess.STDOUT,
    )
    print(f"gateway log: {data / 'gateway.log'}", file=sys.stderr)
    base = f"http://127.0.0.1:{port}"
    # Idle connections expire on the client (2 s) before uvicorn's 5 s keep-alive
    # timeout closes them: otherwise a request can be sent on a connection the
    # server is closing at that instant (a read error that is the client's race).
    load = RawClient("127.0.0.1", port, {"Authorization": f"Bearer {ADMIN}"},
                     max_connections=MAX_IN_FLIGHT + 8, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base, timeout=60,
                                 headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        for _ in range(300):
            try:
                if (await c.get("/healthz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        await deploy(c, "good", GOOD, 5.0, 64)
        for name, (src, timeout_s, mem) in HOSTILE.items():
            await deploy(c, name, src, timeout_s, mem)
        await capacity(load, 2.0)  # warm up
        cap = await capacity(load, args.capacity_seconds)
        rate = args.rate or max(1.0, cap * args.load)
        print(f"warm capacity at concurrency 8: {cap:.0f}/s; soak rate {rate:.0f}/s")

        base_stats: dict[str, Any] = {"lat": [], "bad": 0}
        await open_loop(load, rate, args.baseline_seconds, base_stats)
        print("baseline done", file=sys.stderr)

        soak_stats: dict[str, Any] = {"lat": [], "bad": 0}
        counts: dict[str, int] = {}
        samples: list[dict[str, float]] = [sample(proc.pid)]
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                await asyncio.sleep(args.sample_every)
                samples.append(sample(proc.pid))

        spans: list[tuple[str, float, float]] = []
        hostile = [
            asyncio.create_task(hostile_loop(load, stop, counts, spans, args.hostile))
            for _ in range(2)
        ]
        sampling = asyncio.create_task(sampler())
        await open_loop(load, rate, args.duration, soak_stats)
        print("soak done", file=sys.stderr)
        stop.set()
        await asyncio.gather(*hostile, sampling)
        await asyncio.sleep(args.sample_every)
        samples.append(sample(proc.pid))
        settled = None
        if args.settle > 0:
            # Idle workers are reaped after NSFAAS_WARM_IDLE_S: what is left after
            # that is what a leak would leave.
            await asyncio.sleep(args.settle)
            settled = sample(proc.pid)

        # The slowest and the wrong good calls, with what the gateway recorded.
        calls = soak_stats.get("calls", [])
        assert isinstance(calls, list)
        worst = sorted(calls, reverse=True)[:8] + [x for x in calls if not x[2]][:8]
        print("\nslowest and wrong good calls (ms, s into the soak, ok, answer; record):")
        t0 = float(soak_stats["t0"])
        for ms, at, ok, what in worst:
            # The hostile calls that were running while this one waited.
            began, ended = t0 + at, t0 + at + ms / 1000
            overlap = sorted({n for n, a, b in spans if a < ended and b > began})
            rec = f"hostile: {','.join(overlap) or '-'} "
            parts = what.split(" ")
            if len(parts) > 1 and len(parts[1]) == 24:
                r = await c.get(f"/api/v1/invocations/{parts[1]}")
                if r.status_code == 200:
                    j = r.json()
                    rec += (f"outcome={j['outcome']} start={j['start']} wall_ms={j['wall_ms']}"
                           f" queued={j.get('queue_ms')}")
            print(f"  {ms:8.1f} {at:6.1f}s {ok} {what[:160]!r} {rec}")
        print(f"\ngood calls by {args.timeline:g} s of the soak:")
        print("\n".join(timeline(calls, args.timeline)))
        print("\ngood calls by the hostile calls running at the same time:")
        print("\n".join(by_overlap(calls, t0, spans)))
        dump = data / "soak-calls.json"
        dump.write_text(json.dumps({
            "t0": t0, "good": calls, "hostile": spans, "rate": rate,
        }))
        print(f"every call: {dump}")

    await load.aclose()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)

    b_lat, s_lat = base_stats["lat"], soak_stats["lat"]
    assert isinstance(b_lat, list) and isinstance(s_lat, list)
    b99, s99 = pct(b_lat, 0.99), pct(s_lat, 0.99)
    print()
    print("| run | requests | lost or wrong | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    print(f"| good alone | {len(b_lat)} | {base_stats['bad']} | {statistics.median(b_lat):.1f} | "
          f"{b99:.1f} |")
    print(f"| good + hostile | {len(s_lat)} | {soak_stats['bad']} | {statistics.median(s_lat):.1f}"
          f" | {s99:.1f} |")
    print(f"\np99 ratio (soak / alone): {s99 / b99:.2f} (target <= 2.0)")
    print(f"hostile calls by outcome: {json.dumps(counts, sort_keys=True)}")
    if settled is not None:
        print(f"\nafter {args.settle:g} s idle: " + ", ".join(
            f"{k} {settled[k]:.0f} ({settled[k] - samples[0][k]:+.0f})" for k in BOUNDS))
    print("\n| resource | first | last | max | growth | bound |")
    print("|---|---|---|---|---|---|")
    failures = []
    for key, bound in BOUNDS.items():
        first, last = samples[0][key], samples[-1][key]
        peak = max(s[key] for s in samples)
        growth = last - first
        print(f"| {key} | {first:.0f} | {last:.0f} | {peak:.0f} | {growth:+.0f} | {bound} |")
        if growth > bound:
            failures.append(f"{key} grew by {growth:.0f} (bound {bound})")
    if soak_stats["bad"] or base_stats["bad"]:
        failures.append("good responses lost or wrong")
    if s99 > 2 * b99:
        failures.append(f"p99 under hostile load {s99:.1f} ms > 2x {b99:.1f} ms")
    print("\nresult:", "PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    p.add_argument("--baseline-seconds", type=float, default=30.0)
    p.add_argument("--capacity-seconds", type=float, default=5.0)
    p.add_argument("--load", type=float, default=0.8, help="fraction of warm capacity")
    p.add_argument("--rate", type=float, default=0.0,
                   help="good calls per second, instead of --load (to compare two runs)")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--hostile", type=lambda v: v.split(","), default=list(HOSTILE),
                   help="comma-separated hostile functions to call (default: all)")
    p.add_argument("--timeline", type=float, default=30.0, help="seconds per line of the timeline")
    p.add_argument(
        "--settle", type=float, default=0.0,
        help="after the soak, sample again after this many idle seconds (set "
        "NSFAAS_WARM_IDLE_S below it to see the resources once idle workers are reaped)",
    )
    sys.exit(asyncio.run(main(p.parse_args())))
