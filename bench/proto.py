"""The issue's throwaway prototype, rebuilt as a yardstick: one jailed Python process
forking per request (two children forked ahead, as the product keeps), with no
per-invocation limits (issue 6 quotes it: p50 0.85 ms at
c=1, 1,200-2,100 req/s at c=8 on this kind of machine).

    python bench/proto.py PORT        # serve GET /fn/hello on 127.0.0.1:PORT

What it keeps of the product: a Starlette route under the same uvicorn settings, and a
jail made by the same nsjail binary (user, pid, mount, network, IPC and UTS namespaces,
a read-only root, no network) in which a stdlib-only zygote has imported the hello
handler and forks one child per request. What it leaves out, and the product cannot:
cgroups and rlimits per call, timeouts, output caps, stdout/stderr/log capture, the
invocation record, logs, metrics, routing to tenants and functions, backpressure. The
child answers over the connection the gateway opened to the zygote's Unix socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ZYGOTE = r"""
import json, os, select, signal, socket, sys

def handler(request):
    return {'hello': request.get('query', {}).get('name', 'world')}

def child():
    conn, _ = srv.accept()
    os.write(took, b'.')  # the zygote forks the next spare
    data = b''
    while not data.endswith(b'\n'):
        chunk = conn.recv(65536)
        if not chunk:
            os._exit(1)
        data += chunk
    conn.sendall(json.dumps(handler(json.loads(data))).encode())
    os._exit(0)

def spare():
    if os.fork() == 0:
        child()

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1])
srv.listen(512)
wait, took = os.pipe()
for _ in range(2):  # two spares already forked, as the product keeps
    spare()
print('ready', flush=True)
poller = select.poll()
poller.register(wait, select.POLLIN)
poller.register(1, 0)  # POLLERR once the server (our stdout's reader) is gone
while True:
    for fd, _ in poller.poll():
        if fd == 1:
            os.kill(-1, signal.SIGKILL)  # pid 1 of the jail: every child
            os._exit(0)
        for _ in os.read(wait, 64):
            spare()
"""


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start_jail(workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    from jail.runner import find_nsjail

    nsjail = find_nsjail(None)
    sock_dir = workdir / "sock"
    sock_dir.mkdir()
    os.chmod(sock_dir, 0o777)  # noqa: S103 (the jail's uid binds its socket here)
    python = shutil.which("python3", path="/usr/bin") or "/usr/bin/python3"
    cmd = [
        str(nsjail), "-Mo", "--quiet", "--disable_clone_newcgroup",
        "--chroot", "/", "--bindmount", f"{sock_dir}:/sock",
        "--user", "65534:65534:1", "--group", "65534:65534:1", "--rlimit_as", "inf",
        "--rlimit_nproc", "soft", "--time_limit", "0", "--",
        python, "-I", "-S", "-c", ZYGOTE, "/sock/z.sock",
    ]
    # uvicorn re-raises SIGTERM after its shutdown, so no finally of ours runs
    # then: nsjail dies with us, and the zygote sees its stdout's reader go.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        raise SystemExit(f"prototype jail did not start: {line!r}")
    return proc, sock_dir / "z.sock"


def serve(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    workdir = Path(tempfile.mkdtemp(prefix="nsproto-", dir="/tmp"))
    os.chmod(workdir, 0o711)  # noqa: S103
    jail, sock = start_jail(workdir)

    async def hello(request: Request) -> Response:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(json.dumps({"query": dict(request.query_params)}).encode() + b"\n")
        body = await reader.read()
        writer.close()
        return Response(body, media_type="application/json")

    app = Starlette(routes=[Route("/fn/hello", hello)])
    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, timeout_graceful_shutdown=15)
    finally:
        jail.kill()
        jail.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
