"""Log store at scale: insert N lines across F functions, time first-page queries.

    .venv/bin/python bench/bench_logs.py [--lines 1000000] [--functions 100] [--no-fts]

Lines are spread over the last 24 hours, stored up to 30 s late (out of time order, as
when an invocation's lines are stored at its end), 10 functions per tenant, with a
vocabulary where "kraken" is rare (~1 line in 10,000), "timeout" common (~1 in 50) and
"user" in every line.
Each query is the first page (100 lines) through the public `Store` API, median of 5 runs.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway._sqlite import SqliteStore
from gateway.store import NewLogLine, Store

WORDS = (
    "request handled user order payment cart item fetched stored cache miss hit retry "
    "queue worker started finished ok accepted parsed rendered template session token "
    "refresh upstream downstream latency budget shard replica primary read write"
).split()
LEVELS = ["debug"] * 20 + ["info"] * 60 + ["warning"] * 12 + ["error"] * 7 + ["critical"]
BATCH = 5000


def message(rng: random.Random) -> str:
    words = rng.sample(WORDS, 5)
    if rng.random() < 0.02:
        words.append("timeout")
    if rng.random() < 0.0001:
        words.append("kraken")
    return f"{' '.join(words)} user_id={rng.randrange(10_000)} took {rng.randrange(500)}ms"


async def fill(store: Store, lines: int, functions: int) -> tuple[list[str], float]:
    rng = random.Random(42)
    tenants = [(await store.create_tenant(f"bench{t}"))[0].id for t in range(functions // 10)]
    start = time.time() - 86_400
    step = 86_400 / lines
    t0 = time.perf_counter()
    for base in range(0, lines, BATCH):
        batch = []
        for i in range(base, min(base + BATCH, lines)):
            fn = i % functions
            batch.append(
                NewLogLine(
                    # Stored up to 30 s after it was logged, as when an invocation ends.
                    ts=start + i * step - rng.uniform(0, 30),
                    invocation_id=f"inv{i // 20}",
                    tenant_id=tenants[fn // 10],
                    function=f"fn{fn % 10}",
                    level=rng.choice(LEVELS),
                    message=message(rng),
                    fields={"i": i},
                )
            )
        await store.append_logs(batch)
    return tenants, time.perf_counter() - t0


async def timed(run: Callable[[], Awaitable[Any]], repeat: int = 5) -> tuple[float, int]:
    samples, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = await run()
        samples.append((time.perf_counter() - t0) * 1000)
        if isinstance(result, tuple):
            size = len(result[0])
        elif isinstance(result, int):
            size = result
        else:
            size = len(result)
    return statistics.median(samples), size


async def run(args: argparse.Namespace, data_dir: Path) -> None:
    async with SqliteStore(data_dir, fts=not args.no_fts) as store:
        tenants, fill_s = await fill(store, args.lines, args.functions)
        print(
            f"inserted {args.lines:,} lines in {fill_s:.1f} s ({args.lines / fill_s:,.0f} lines/s)"
        )
    # Reopened: cold caches, fresh planner statistics.
    async with SqliteStore(data_dir, fts=not args.no_fts) as store:
        print(f"text search: {'FTS5' if store.fts else 'substring scan'}")
        t = tenants[3]
        now = time.time()
        _, cursor = await store.query_logs(tenant_id=t, function="fn5", limit=100)
        newest = (await store.query_logs(tenant_id=t, function="fn5", limit=1))[0][0].id
        fn = {"tenant_id": t, "function": "fn5"}
        hour_12h_ago = {"since": now - 13 * 3600, "until": now - 12 * 3600}
        cases: list[tuple[str, dict[str, Any]]] = [
            ("function, newest", fn),
            ("function, 1 h window 12 h ago", {**fn, **hour_12h_ago}),
            ("function, level >= error", {**fn, "level_min": "error"}),
            ("function, page 2 (cursor)", {**fn, "cursor": cursor}),
            ("function, q common (timeout)", {**fn, "q": "timeout"}),
            ("function, q rare (kraken)", {**fn, "q": "kraken"}),
            ("function, q two words", {**fn, "q": "payment retry"}),
            ("function, q every line (user)", {**fn, "q": "user"}),
            ("function, q prefix (us*)", {**fn, "q": "us*"}),
            ("function, q punctuation (=)", {**fn, "q": "="}),
            ("function, q + 1 h window", {**fn, "q": "timeout", **hour_12h_ago}),
            ("function, q no match", {**fn, "q": "nosuchword"}),
            ("tenant (10 functions), newest", {"tenant_id": t}),
            ("tenant, q common", {"tenant_id": t, "q": "timeout"}),
            ("all, newest", {}),
            ("all, q rare", {"q": "kraken"}),
            ("all, q common", {"q": "timeout"}),
            ("all, q every line (user)", {"q": "user"}),
            ("all, q rare + 1 h window", {"q": "kraken", **hour_12h_ago}),
            ("all, level >= critical", {"level_min": "critical"}),
            ("invocation id", {"invocation_id": f"inv{args.lines // 40}"}),
        ]
        queries: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            (label, functools.partial(store.query_logs, **kw)) for label, kw in cases
        ]
        queries.append(
            (
                "live tail, last ~100 lines",
                functools.partial(
                    store.logs_after, tenant_id=t, function="fn5", after_id=newest - 10_000
                ),
            )
        )
        print(f"\n{'query (first page, limit 100)':<34} {'median ms':>10} {'rows':>6}")
        print("-" * 52)
        for label, run in queries:
            ms, rows = await timed(run)
            print(f"{label:<34} {ms:>10.2f} {rows:>6}")
        ms, _ = await timed(
            lambda: store.enforce_retention(max_lines_per_function=args.lines, max_age_s=7 * 86_400)
        )
        print(f"{'retention, nothing to delete':<34} {ms:>10.2f}")
        t0 = time.perf_counter()
        deleted = await store.enforce_retention(
            max_lines_per_function=args.lines // args.functions - 100, max_age_s=7 * 86_400
        )
        ms = (time.perf_counter() - t0) * 1000
        print(f"{'retention, 100 lines x 100 fns':<34} {ms:>10.2f} {deleted:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--functions", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=None, help="keep the data here")
    parser.add_argument("--no-fts", action="store_true", help="search by substring scan")
    args = parser.parse_args()
    if args.dir is not None:
        asyncio.run(run(args, args.dir))
        return
    with tempfile.TemporaryDirectory(prefix="nsfaas-bench-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
