"""Where ctx.http.fetch may connect: public addresses only, unless the operator says.

A function's ``egress_allow`` names hosts, and its tenant writes it. A name can
resolve to anything: ``127.0.0.1`` (this gateway, a Redis or Postgres beside
it), ``10.0.0.0/8`` (the operator's network), ``169.254.169.254`` (a cloud's
metadata service, with its credentials). So every connection is checked at the
one place that knows the address actually used: the TCP connect. The name is
resolved here, every address it resolves to must be public (or in the
operator's ``NSFAAS_EGRESS_PRIVATE``), and the connection goes to an address
that was checked, so a second resolution (DNS rebinding) cannot swap it. TLS
still verifies the certificate against the name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from http.cookiejar import Cookie, CookieJar, CookiePolicy
from typing import Any

import httpcore
import httpx

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressBlocked(httpcore.ConnectError):
    """The name resolved to an address a function may not reach."""


def parse_networks(spec: str) -> tuple[Network, ...]:
    """``NSFAAS_EGRESS_PRIVATE``: comma-separated addresses or CIDR blocks."""
    nets = []
    for part in spec.split(","):
        if part.strip():
            nets.append(ipaddress.ip_network(part.strip(), strict=False))
    return tuple(nets)


def permitted(ip: str, extra: Iterable[Network]) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(addr in net for net in extra):
        return True
    # is_global: not loopback, private (RFC 1918, ULA), link-local, shared
    # (100.64/10), reserved, unspecified or documentation space.
    return addr.is_global and not addr.is_multicast


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, extra: tuple[Network, ...]) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._extra = extra

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
            )
        except (OSError, TimeoutError):
            infos = []
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        refused = [ip for ip in addresses if not permitted(ip, self._extra)]
        if refused or not addresses:
            # All or nothing: a name that also resolves to a private address is
            # refused even if a public one comes first. One message for "no
            # such name" and "a private address", and no address in it: a
            # tenant must not map the operator's internal DNS through its
            # allow-list.
            raise EgressBlocked(f"{host!r} does not resolve to public addresses only")
        error: Exception | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(
                    ip, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise EgressBlocked("no Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _RefuseAll(CookiePolicy):
    """Keeps no cookie and sends none.

    The client is shared by every function of every tenant, and httpx's jar
    lives as long as the client: a cookie one tenant's upstream set would go
    out on another tenant's fetches to that host (a session leak, or session
    fixation the other way). A fetch carries only the headers its function
    passed; a function that wants a session keeps its cookies itself.
    """

    netscape = True
    rfc2965 = False
    hide_cookie2 = True

    def set_ok(self, cookie: Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: Cookie, request: object) -> bool:
        return False

    def domain_return_ok(self, domain: str, request: object) -> bool:
        return False

    def path_return_ok(self, path: str, request: object) -> bool:
        return False


def client(private: str = "") -> httpx.AsyncClient:
    """The gateway's client for ctx.http.fetch: no proxies from the environment,
    no redirects of its own (each hop is checked against the allow-list first),
    no cookie jar (see _RefuseAll), and every connection through the address
    check above."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(  # the one hook httpx lacks
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=100,  # httpx's own defaults
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=_GuardedBackend(parse_networks(private)),
    )
    c = httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        transport=transport,
        cookies=CookieJar(policy=_RefuseAll()),
    )
    # httpx's defaults (Accept, Accept-Encoding, Connection, User-Agent) would
    # go out on every fetch: a fetch sends only the headers its function gave
    # (plus Host and Content-Length), and gets the body as the upstream sent it.
    for name in list(c.headers):
        del c.headers[name]
    return c
