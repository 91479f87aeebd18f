"""What a tenant's large uploads cost another tenant's calls.

    .venv/bin/python bench/bench_upload.py [--tree DIR] [--duration 4]

Starts the gateway (from ``--tree``, default this checkout, so two trees can
be compared in the same minutes), deploys a public hello function, and measures
its latency with ``wrk`` at concurrency 1: alone, then while another tenant
uploads ~600 KB Python sources back to back (each takes the check about a
second of CPU). Prints p50/p99 and requests/s of both and their ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_warm import ADMIN, HELLO, free_port, run_wrk, wait_healthy


def heavy(tag: int, lines: int = 12_000) -> str:
    body = "".join(f"a{j} = [{j}, {j * 7}, {j * 13}, {j + 5}, {j * 3}, 6, 7, 8]\n"
                   for j in range(lines))
    return body + f"def handler(r, c):\n    return {tag}\n"


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--duration", type=float, default=4.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nsbu-", dir="/tmp"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSFAAS_")}
    env.update(NSFAAS_DATA_DIR=str(work / "data"), NSFAAS_HOST="127.0.0.1",
               NSFAAS_PORT=str(port), NSFAAS_ADMIN_KEY=ADMIN)
    log = work / "gw.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], cwd=args.tree,
                                env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    stop = threading.Event()
    uploads: list[float] = []
    try:
        wait_healthy(f"{base}/healthz", proc, log)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        r = httpx.put(f"{base}/api/v1/functions/hello", json={"source": HELLO, "public": True},
                      headers=admin, timeout=30)
        assert r.status_code in (200, 201), r.text
        r = httpx.post(f"{base}/api/v1/tenants", json={"name": "uploader"}, headers=admin)
        key = {"Authorization": f"Bearer {r.json()['key']}"}
        url = f"{base}/fn/hello"
        run_wrk(url, 1, 1.0)
        alone = run_wrk(url, 1, args.duration)

        def upload_loop() -> None:
            i = 0
            with httpx.Client(timeout=120) as client:
                while not stop.is_set():
                    i += 1
                    r = client.put(f"{base}/api/v1/functions/big", json={"source": heavy(i)},
                                   headers=key)
                    assert r.status_code in (200, 201), r.text
                    uploads.append(r.elapsed.total_seconds())

        thread = threading.Thread(target=upload_loop, daemon=True)
        thread.start()
        while not uploads:  # the first check (and the checker's start) is done
            thread.join(0.1)
        during = run_wrk(url, 1, args.duration)
        stop.set()
        thread.join()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print(f"tree {args.tree}")
    print(f"alone:          p50 {alone[0]:.2f} ms  p99 {alone[1]:.2f} ms  {alone[2]:,.0f}/s")
    print(f"during uploads: p50 {during[0]:.2f} ms  p99 {during[1]:.2f} ms  {during[2]:,.0f}/s"
          f"  ({len(uploads)} uploads, {sum(uploads) / len(uploads):.2f} s each)")
    print(f"ratio:          p50 {during[0] / alone[0]:.2f}x  p99 {during[1] / alone[1]:.2f}x  "
          f"throughput {during[2] / alone[2]:.2f}x")


if __name__ == "__main__":
    main()
