"""Hostile functions against the network: no IP at all, no host sockets.

Two layers hold: a network namespace with only a down loopback, and seccomp
refusing every socket family but AF_UNIX with EAFNOSUPPORT. The tests listen
on the host themselves and check that nothing ever reached them.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Iterator

import pytest

from tests.jailtest import Jail, body_json

CONNECT = """
import errno, json, socket

def handler(request, ctx):
    args = json.loads(request.body)
    out = {}
    try:
        s = socket.create_connection(("127.0.0.1", args["tcp"]), timeout=2)
        s.sendall(b"escaped")
        out["tcp"] = "CONNECTED"
    except OSError as e:
        out["tcp"] = [type(e).__name__, errno.errorcode.get(e.errno, e.errno)]
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"escaped", ("127.0.0.1", args["udp"]))
        out["udp"] = "SENT"
    except OSError as e:
        out["udp"] = [type(e).__name__, errno.errorcode.get(e.errno, e.errno)]
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect("\\0" + args["abstract"])
        s.sendall(b"escaped")
        out["abstract"] = "CONNECTED"
    except OSError as e:
        out["abstract"] = [type(e).__name__, errno.errorcode.get(e.errno, e.errno)]
    return out
"""


@pytest.fixture
def listeners() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, str]]:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    name = f"nsfaas-test-{os.getpid()}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + name)
    abstract.listen(8)
    abstract.setblocking(False)
    try:
        yield tcp, udp, abstract, name
    finally:
        for s in (tcp, udp, abstract):
            s.close()


async def test_no_connection_reaches_the_host(
    jail: Jail, mode: str, listeners: tuple[socket.socket, socket.socket, socket.socket, str]
) -> None:
    tcp, udp, abstract, name = listeners
    args = {"tcp": tcp.getsockname()[1], "udp": udp.getsockname()[1], "abstract": name}
    fn = jail.function(CONNECT, mode)
    got = body_json(await fn(json.dumps(args)))
    assert got == {
        # seccomp: socket(AF_INET, ...) itself fails
        "tcp": ["OSError", "EAFNOSUPPORT"],
        "udp": ["OSError", "EAFNOSUPPORT"],
        # AF_UNIX is allowed, but abstract names live in the network namespace
        "abstract": ["ConnectionRefusedError", "ECONNREFUSED"],
    }
    # And nothing arrived on the host.
    for s in (tcp, abstract):
        with pytest.raises(BlockingIOError):
            s.accept()
    with pytest.raises(BlockingIOError):
        udp.recvfrom(64)
    await fn.assert_recovers()


async def test_dns_fails(jail: Jail, mode: str) -> None:
    src = """
import socket

def handler(request, ctx):
    out = {}
    for host in ("example.com", "localhost", "metadata.google.internal", "host.docker.internal"):
        try:
            out[host] = socket.getaddrinfo(host, 80)
        except socket.gaierror as e:
            out[host] = ["gaierror", e.errno]
    try:
        out["gethostbyname"] = socket.gethostbyname("example.com")
    except socket.gaierror as e:
        out["gethostbyname"] = ["gaierror", e.errno]
    return out
"""
    fn = jail.function(src, mode)
    got = body_json(await fn())
    # No resolver reachable (no /etc/resolv.conf, no /etc/hosts, no IP sockets).
    assert got == {
        "example.com": ["gaierror", socket.EAI_AGAIN],
        "localhost": ["gaierror", socket.EAI_AGAIN],
        "metadata.google.internal": ["gaierror", socket.EAI_AGAIN],
        "host.docker.internal": ["gaierror", socket.EAI_AGAIN],
        "gethostbyname": ["gaierror", socket.EAI_NONAME],
    }
    await fn.assert_recovers()


FAMILIES = {
    "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17, "AF_KEY": 15,
    "AF_ALG": 38, "AF_VSOCK": 40, "AF_BLUETOOTH": 31, "AF_CAN": 29, "AF_TIPC": 30,
    "AF_XDP": 44, "AF_RDS": 21, "AF_APPLETALK": 5, "AF_X25": 9,
}


async def test_every_family_but_unix_is_refused(jail: Jail, mode: str) -> None:
    src = """
import errno, json, socket

def handler(request, ctx):
    out = {}
    for name, family in json.loads(request.body).items():
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW):
            try:
                socket.socket(family, kind).close()
                out[f"{name}/{int(kind)}"] = "OK"
            except OSError as e:
                out[f"{name}/{int(kind)}"] = errno.errorcode.get(e.errno, e.errno)
    a, b = socket.socketpair()
    a.sendall(b"unix works")
    out["unix"] = b.recv(64).decode()
    return out
"""
    fn = jail.function(src, mode)
    got = body_json(await fn(json.dumps(FAMILIES)))
    assert got.pop("unix") == "unix works"
    assert set(got.values()) == {"EAFNOSUPPORT"}, got
    assert len(got) == 3 * len(FAMILIES)
    await fn.assert_recovers()


async def test_no_interfaces_to_configure(jail: Jail, mode: str) -> None:
    src = """
import ctypes, errno, socket

def handler(request, ctx):
    try:
        names = socket.if_nameindex()
    except OSError as e:
        names = errno.errorcode.get(e.errno, e.errno)
    return {"if_nameindex": names}
"""
    fn = jail.function(src, mode)
    got = body_json(await fn())
    # if_nameindex() needs a netlink socket, which seccomp refuses.
    assert got == {"if_nameindex": errno.errorcode[errno.EAFNOSUPPORT]}
    await fn.assert_recovers()
