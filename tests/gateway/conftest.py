"""Fixtures: a real app (real store, real jails) behind httpx's ASGI transport."""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.config import Settings
from jail import choose_jail_dir

ADMIN = "test-admin-key"


@dataclass
class Api:
    client: httpx.AsyncClient
    settings: Settings
    app: object

    def auth(self, key: str = ADMIN) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def deploy(
        self, name: str, source: str, key: str = ADMIN, **opts: object
    ) -> httpx.Response:
        resp = await self.client.put(
            f"/api/v1/functions/{name}", json={"source": source, **opts}, headers=self.auth(key)
        )
        assert resp.status_code in (200, 201), resp.text
        return resp

    async def tenant(self, name: str) -> str:
        resp = await self.client.post("/api/v1/tenants", json={"name": name}, headers=self.auth())
        assert resp.status_code == 201, resp.text
        return str(resp.json()["key"])


def zip_b64(files: dict[str, str]) -> str:
    """A zip of ``files`` (name -> text), base64 as an upload's ``archive``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return base64.b64encode(buffer.getvalue()).decode()


def make_settings(data_dir: Path, **kw: object) -> Settings:
    base: dict[str, object] = {
        "data_dir": data_dir,
        "admin_key": ADMIN,
        "default_timeout_s": 5.0,
        "warm_idle_s": 30.0,
        "queue_size": 256,
        "queue_timeout_s": 60.0,
        # The upstream test servers listen on loopback, which functions may
        # not reach unless the operator says so (tests/gateway/test_egress.py).
        "egress_private": "127.0.0.0/8",
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    """Warm by default; ``@pytest.mark.parametrize("api", ["warm", "cold"], indirect=True)``,
    or a dict of settings (``[{"tenant_code_bytes": 1000}]``)."""
    param = getattr(request, "param", "warm")
    kw = dict(param) if isinstance(param, dict) else {"warm": param == "warm"}
    settings = make_settings(tmp_path / "data", **kw)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://nsfaas.test", timeout=30
        ) as client:
            yield Api(client, settings, app)
    shutil.rmtree(choose_jail_dir(settings.data_dir), ignore_errors=True)


class QuietHandler(BaseHTTPRequestHandler):
    """A test upstream's handler: no access log, and a helper for a plain answer."""

    def send_body(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Upstream(QuietHandler):
    """A plain HTTP server on loopback for ctx.http.fetch tests."""

    def do_GET(self) -> None:
        if self.path == "/redirect":  # to the same server under another address
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{self.server.server_address[1]}/x")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/bad-redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:notaport/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/slow":  # a byte every 0.2 s: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Length", "50")
            self.end_headers()
            for _ in range(50):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
            return
        if self.path == "/gzip":  # compressed, and what the request carried
            import gzip

            packed = gzip.compress(b"hello, compressed" * 10)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(packed)))
            self.send_header("X-Got", ",".join(sorted(k.lower() for k in self.headers)))
            self.end_headers()
            self.wfile.write(packed)
            return
        self.send_body(b"hello from upstream")


@contextlib.contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1") -> Iterator[int]:
    """A threaded HTTP server with ``handler`` for as long as the block runs; its port."""
    server = ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def upstream() -> Iterator[int]:
    """The port of a local HTTP server (see _Upstream)."""
    with serve_http(_Upstream) as port:
        yield port
