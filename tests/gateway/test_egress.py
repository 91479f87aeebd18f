"""ctx.http.fetch reaches public addresses only: a tenant's allow-list names
hosts, and a name (or an IP literal) may point at this gateway, a database
beside it, the operator's network or a cloud's metadata service."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.egress import parse_networks, permitted
from jail import choose_jail_dir

from .conftest import Api, make_settings


@pytest.mark.parametrize(
    ("ip", "ok"),
    [
        ("127.0.0.1", False),
        ("127.9.9.9", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # shared address space
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("fc00::1", False),
        ("fe80::1%2", False),
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
    ],
)
def test_only_public_addresses(ip: str, ok: bool) -> None:
    assert permitted(ip, ()) is ok


def test_the_operator_may_open_private_networks() -> None:
    nets = parse_networks("10.1.2.0/24, 127.0.0.1")
    assert permitted("10.1.2.7", nets) and permitted("127.0.0.1", nets)
    assert not permitted("10.1.3.7", nets) and not permitted("127.0.0.2", nets)


FETCH = """
def handler(request, ctx):
    try:
        r = ctx.http.fetch("GET", request.query["url"])
        return {"status": r.status}
    except Exception as exc:
        return {"error": getattr(exc, "code", type(exc).__name__), "message": str(exc)}
"""


async def test_loopback_is_unreachable_even_when_allow_listed(
    tmp_path: Path, upstream: int
) -> None:
    settings = make_settings(tmp_path / "data", egress_private="")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            api = Api(c, settings, app)
            allow = [f"127.0.0.1:{upstream}", f"localhost:{upstream}", "no-such.invalid"]
            await api.deploy("fetch", FETCH, public=True, egress_allow=allow)
            # A name that does not resolve gets the same answer as a private
            # one, and no answer names an address: the allow-list is no probe
            # of the operator's DNS.
            for url in (f"http://127.0.0.1:{upstream}/", f"http://localhost:{upstream}/",
                        "http://no-such.invalid/"):
                r = await c.get("/fn/fetch", params={"url": url})
                body = r.json()
                assert body["error"] == "egress_denied", (url, body)
                host = url.split("//")[1].split(":")[0].rstrip("/")
                assert body["message"] == (
                    f"egress_denied: {host!r} does not resolve to public addresses only"
                ), body
    shutil.rmtree(choose_jail_dir(settings.data_dir), ignore_errors=True)


SLOW = """
import time
from nsfaas import ProxyError

def handler(request, ctx):
    t0 = time.monotonic()
    try:
        ctx.http.fetch("GET", request.query["url"], timeout=1)
        return {"error": None}
    except ProxyError as exc:
        return {"error": exc.code, "s": round(time.monotonic() - t0, 1)}
"""


async def test_a_fetch_has_one_deadline_for_the_whole_answer(api: Api, upstream: int) -> None:
    """httpx's timeout is per read: an upstream sending a byte every 0.2 s held
    a fetch with timeout=1 until the function's own timeout."""
    await api.deploy("slowfetch", SLOW, public=True, egress_allow=[f"127.0.0.1:{upstream}"])
    r = await api.client.get("/fn/slowfetch", params={"url": f"http://127.0.0.1:{upstream}/slow"})
    body = r.json()
    assert body["error"] == "egress_failed" and body["s"] < 3, body


RELAY = """
import gzip

def handler(request, ctx):
    r = ctx.http.fetch("GET", request.query["url"])
    h = {k.lower(): v for k, v in r.headers.items()}
    return {"encoding": h.get("content-encoding"), "length": int(h["content-length"]),
            "body": len(r.body), "text": gzip.decompress(r.body).decode()[:17],
            "sent": h["x-got"]}
"""


async def test_a_fetch_gets_the_body_as_sent_and_sends_only_its_headers(
    api: Api, upstream: int
) -> None:
    """The body used to be decompressed under the upstream's Content-Encoding
    and Content-Length, so a function passing the answer on served a plain body
    labelled gzip (clients failed to decode it); and httpx's own Accept,
    Accept-Encoding, Connection and User-Agent went out on every fetch."""
    await api.deploy("pass", RELAY, public=True, egress_allow=[f"127.0.0.1:{upstream}"])
    r = await api.client.get("/fn/pass", params={"url": f"http://127.0.0.1:{upstream}/gzip"})
    got = r.json()
    assert got["encoding"] == "gzip" and got["length"] == got["body"], got
    assert got["text"] == "hello, compressed"
    assert got["sent"] == "host", got
