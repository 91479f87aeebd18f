"""The ``nsfaas`` command: serve the gateway, or talk to one over HTTP."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

COLORS = {
    "debug": "\033[2m",
    "info": "\033[36m",
    "warning": "\033[33m",
    "error": "\033[31m",
    "critical": "\033[1;31m",
}
RESET = "\033[0m"
# `nsfaas serve`'s shutdown (SIGTERM, SIGINT): invocations still running this
# long after it began are ended by the gateway, with an answer and a record;
# uvicorn cancels whatever request is still open at the grace deadline.
SHUTDOWN_DRAIN_S = 12.0
SHUTDOWN_GRACE_S = 15

# What a function writes (log messages, fields, error messages, paths) reaches
# the operator's terminal through this command: a raw ESC, CR or NUL there
# could recolour, rewrite or hide lines, or forge others. C0 but tab, DEL, C1
# and lone surrogates (which also cannot be encoded for output) print as
# escapes; printable unicode stays as it is.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c != 0x09} | {
    c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), *range(0xD800, 0xE000))
}
# A response body keeps its lines.
_BODY_ESCAPES = {c: e for c, e in _ESCAPES.items() if c != 0x0A}


def _safe(value: object) -> str:
    """``str(value)``, with control characters escaped for a terminal."""
    return str(value).translate(_ESCAPES)


def _client(args: argparse.Namespace) -> httpx.Client:
    key = args.key or os.environ.get("NSFAAS_KEY") or os.environ.get("NSFAAS_ADMIN_KEY")
    if not key:
        data_dir = Path(os.environ.get("NSFAAS_DATA_DIR", ".nsfaas"))
        key_file = data_dir / "admin.key"
        if key_file.exists():
            key = key_file.read_text().strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout)


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            msg = f"{err['code']}: {err['message']}"
        except (ValueError, KeyError, TypeError):
            msg = resp.text[:500]
        sys.stderr.write(f"error ({resp.status_code}) {_safe(msg)}\n")
        raise SystemExit(1)
    if resp.status_code == 204 or not resp.content:
        return None
    return resp.json()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import GatewayServer, create_app
    from .config import Settings, SettingsError
    from .httpproto import header_limited_protocol
    from .logconfig import configure_logging

    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        sys.stderr.write(f"nsfaas: {exc}\n")
        return 2
    if args.examples:
        from dataclasses import replace

        settings = replace(settings, examples_dir=Path(args.examples))
    try:
        protocol = header_limited_protocol(settings.max_header_bytes)
    except SettingsError as exc:
        sys.stderr.write(f"nsfaas: {exc}\n")
        return 2
    configure_logging()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        log_config=None,
        access_log=False,  # RequestContextMiddleware writes it
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    # After SHUTDOWN_DRAIN_S the gateway ends the invocations still running
    # (answered 502 killed, recorded GatewayStopped); uvicorn cancels what is
    # left of the open requests (log tails, slow clients) at SHUTDOWN_GRACE_S.
    server = GatewayServer(config, app.state.gateway, drain_s=SHUTDOWN_DRAIN_S)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 3  # uvicorn.run's exit status for a failed start


def cmd_deploy(args: argparse.Namespace) -> int:
    from .deploy import zip_folder

    path = Path(args.path)
    body: dict[str, Any] = {}
    if path.is_dir():
        body["archive"] = base64.b64encode(zip_folder(path)).decode()
        meta = path / "function.json"
        if meta.exists():
            body.update(json.loads(meta.read_text()))
    else:
        body["source"] = path.read_text()
    if args.route:
        body["routes"] = args.route
    if args.public:
        body["public"] = True
    if args.timeout_s is not None:
        body["timeout_s"] = args.timeout_s
    if args.memory_mb is not None:
        body["memory_mb"] = args.memory_mb
    for item in args.env or []:
        k, _, v = item.partition("=")
        body.setdefault("env", {})[k] = v
    with _client(args) as c:
        out = _check(c.put(f"/api/v1/functions/{args.name}", json=body))
    print(f"deployed {_safe(out['name'])} version {out['version']}")
    return 0


def cmd_invoke(args: argparse.Namespace) -> int:
    with _client(args) as c:
        data = args.data.encode() if args.data is not None else b""
        resp = c.request(args.method, f"/fn/{args.name}{args.path}", content=data)
    inv_id = _safe(resp.headers.get("x-invocation-id"))
    sys.stderr.write(f"{resp.status_code} invocation {inv_id}\n")
    text = resp.text
    if sys.stdout.isatty():
        # Read on a terminal, it is escaped like the rest; piped, it is the
        # function's data and goes out as it is.
        text = text.translate(_BODY_ESCAPES)
    sys.stdout.write(text)
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    return 0 if resp.status_code < 400 else 1


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as c:
        out = _check(c.get("/api/v1/functions"))
    for f in out["functions"]:
        vis = "public" if f["public"] else "private"
        routes = " ".join(_safe(r) for r in f["routes"])
        print(f"{_safe(f['name']):<24} v{f['version']:<4} {vis:<8} {routes}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _check(c.delete(f"/api/v1/functions/{args.name}"))
    print(f"deleted {args.name}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    with _client(args) as c:
        out = _check(c.get(f"/api/v1/functions/{args.name}/versions"))
    for v in out["versions"]:
        mark = "*" if v["version"] == out["active_version"] else " "
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["created_at"]))
        print(f"{mark} v{v['version']:<4} {when} {v['digest'][:12]} {v['size']} bytes")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _client(args) as c:
        out = _check(
            c.post(f"/api/v1/functions/{args.name}/rollback", json={"version": args.version})
        )
    print(f"{_safe(args.name)} now at version {out['version']}")
    return 0


def _print_line(line: dict[str, Any], as_json: bool, color: bool) -> None:
    if as_json:
        print(json.dumps(line))
        return
    ts = (
        time.strftime("%H:%M:%S", time.localtime(line["ts"])) + f".{int(line['ts'] % 1 * 1000):03d}"
    )
    level = line["level"]
    lvl = f"{COLORS.get(level, '')}{_safe(level):<8}{RESET}" if color else f"{_safe(level):<8}"
    inv = _safe((line.get("invocation_id") or "")[-8:])
    fields = {k: v for k, v in (line.get("fields") or {}).items() if k != "stream"}
    extra = " " + _safe(json.dumps(fields, ensure_ascii=False)) if fields else ""
    print(f"{ts} {lvl} {inv} {_safe(line['message'])}{extra}", flush=True)


def cmd_logs(args: argparse.Namespace) -> int:
    color = sys.stdout.isatty() and not args.json
    params: dict[str, str] = {}
    if args.since:
        params["since"] = args.since
    if args.level:
        params["level"] = args.level
    if args.grep:
        params["q"] = args.grep
    with _client(args) as c:
        out = _check(
            c.get(f"/api/v1/functions/{args.name}/logs", params={**params, "limit": "100"})
        )
        for line in reversed(out["logs"]):
            _print_line(line, args.json, color)
        if not args.follow:
            return 0
        follow = {**params, "follow": "1"}
        follow.pop("since", None)
        with c.stream(
            "GET", f"/api/v1/functions/{args.name}/logs", params=follow, timeout=None
        ) as resp:
            for raw in resp.iter_lines():
                if raw.startswith("data: "):
                    _print_line(json.loads(raw[6:]), args.json, color)
    return 0


def cmd_invocations(args: argparse.Namespace) -> int:
    params = {"function": args.name, "limit": str(args.limit)}
    if args.outcome:
        params["outcome"] = args.outcome
    with _client(args) as c:
        out = _check(c.get("/api/v1/invocations", params=params))
    for r in out["invocations"]:
        if args.json:
            print(json.dumps(r))
            continue
        when = time.strftime("%H:%M:%S", time.localtime(r["started_at"]))
        wall = f"{r['wall_ms']:.1f}ms" if r["wall_ms"] is not None else "-"
        print(
            f"{when} {_safe(r['id'])} {_safe(r['outcome']):<12} {r['status'] or '-':<4} "
            f"{wall:>9} {_safe(r['start'] or '-'):<5} {_safe(r['error_message'] or '')}"
        )
    return 0


def cmd_tenant(args: argparse.Namespace) -> int:
    with _client(args) as c:
        out = _check(c.post("/api/v1/tenants", json={"name": args.name}))
    print(
        f"tenant {_safe(out['name'])} ({_safe(out['id'])})\n"
        f"key: {_safe(out['key'])}  (shown once; keep it)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsfaas", description="nsfaas: functions in nsjail")
    p.add_argument("--url", default=os.environ.get("NSFAAS_URL", "http://127.0.0.1:8080"))
    p.add_argument("--key", default=None, help="API key (default: $NSFAAS_KEY, admin.key)")
    p.add_argument("--timeout", type=float, default=60.0)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--examples", help="deploy the example functions in this folder")
    s.set_defaults(fn=cmd_serve)
    s = sub.add_parser("deploy", help="deploy a file or folder")
    s.add_argument("name")
    s.add_argument("path")
    s.add_argument("--route", action="append", help='e.g. "GET /hello/{who}"')
    s.add_argument("--public", action="store_true")
    s.add_argument("--timeout-s", type=float, dest="timeout_s")
    s.add_argument("--memory-mb", type=int, dest="memory_mb")
    s.add_argument("--env", action="append", help="NAME=value")
    s.set_defaults(fn=cmd_deploy)
    s = sub.add_parser("invoke", help="call a function")
    s.add_argument("name")
    s.add_argument("--data", "-d")
    s.add_argument("--method", "-X", default="POST")
    s.add_argument("--path", default="")
    s.set_defaults(fn=cmd_invoke)
    s = sub.add_parser("ls", help="list functions")
    s.set_defaults(fn=cmd_ls)
    s = sub.add_parser("rm", help="delete a function")
    s.add_argument("name")
    s.set_defaults(fn=cmd_rm)
    s = sub.add_parser("versions", help="list versions of a function")
    s.add_argument("name")
    s.set_defaults(fn=cmd_versions)
    s = sub.add_parser("rollback", help="activate an earlier version")
    s.add_argument("name")
    s.add_argument("version", type=int)
    s.set_defaults(fn=cmd_rollback)
    s = sub.add_parser("logs", help="show or follow a function's logs")
    s.add_argument("name")
    s.add_argument("-f", "--follow", action="store_true")
    s.add_argument("--since")
    s.add_argument("--level")
    s.add_argument("--grep")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_logs)
    s = sub.add_parser("invocations", help="list a function's invocations")
    s.add_argument("name")
    s.add_argument("--outcome")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_invocations)
    s = sub.add_parser("tenant", help="create a tenant (admin key)")
    s.add_argument("name")
    s.set_defaults(fn=cmd_tenant)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except httpx.HTTPError as exc:
        sys.stderr.write(f"nsfaas: cannot reach {_safe(args.url)}: {_safe(exc)}\n")
        return 1
    except BrokenPipeError:
        # `nsfaas logs NAME | head`: the reader left; exit quietly like other tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
