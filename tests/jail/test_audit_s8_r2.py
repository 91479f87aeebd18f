"""Session 8's audit, second round, without jails: outside-uid bands are
coordinated between pools (gateways) on one host, the gateway's own device
nodes, and the proxy's budget of new connections."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from jail import cgroups
from jail.cgroups import JAIL_UID_BAND, JAIL_UID_BASE, Cgroups, SlotPool
from jail.command import without_host_devices
from jail.errors import JailUnavailable
from jail.proxy import HostProxy
from jail.runner import REPO_CFG, make_devices
from tests.jail.test_proxy_identity import NEW, OLD, Methods, client, frame, reply

V1 = Cgroups(version=1, parent="nsfaas", root=Path("/sys/fs/cgroup"))


def _first_uid(pool: SlotPool) -> int:
    assert pool.band is not None
    return JAIL_UID_BASE + pool.band * JAIL_UID_BAND


def test_two_pools_in_one_process_get_different_bands(tmp_path: Path) -> None:
    pools = [SlotPool(V1, JAIL_UID_BASE, band_locks=tmp_path) for _ in range(2)]
    try:
        assert pools[0].band != pools[1].band
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            f"{p.band}.lock" for p in pools)
        assert _first_uid(pools[0]) != _first_uid(pools[1])
    finally:
        for p in pools:
            p.close()


def test_many_pools_never_share_a_band(monkeypatch: pytest.MonkeyPatch) -> None:
    """32 pools among 64 bands: drawn at random without coordination, two of
    them share a band with probability 99.97%; the locks (in the default
    directory, as two gateways would use) keep them apart."""
    monkeypatch.setattr(cgroups, "JAIL_UID_BANDS", 64)
    pools = []
    try:
        for _ in range(32):
            pools.append(SlotPool(V1, JAIL_UID_BASE))
        first_uids = [p._uid0 for p in pools]
        assert len(set(first_uids)) == 32, sorted(first_uids)
    finally:
        for p in pools:
            p.close()


def test_a_band_whose_lock_is_held_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another gateway holds band 0 (its flock); with two bands, a pool takes
    band 1, a third finds none and says so; once a pool closes, its band is free."""
    monkeypatch.setattr(cgroups, "JAIL_UID_BANDS", 2)
    held = os.open(tmp_path / "0.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        for _ in range(10):  # bands are tried in random order
            pool = SlotPool(V1, JAIL_UID_BASE, band_locks=tmp_path)
            assert pool.band == 1
            with pytest.raises(JailUnavailable):
                SlotPool(V1, JAIL_UID_BASE, band_locks=tmp_path)
            pool.close()
    finally:
        os.close(held)


def test_the_default_lock_dir_is_used_and_a_pool_without_uids_takes_no_band() -> None:
    pool = SlotPool(V1, JAIL_UID_BASE)
    try:
        assert pool.band is not None
        dirs = [d for d in cgroups.BAND_LOCK_DIRS if (d / f"{pool.band}.lock").exists()]
        assert dirs, cgroups.BAND_LOCK_DIRS
        fd = os.open(dirs[0] / f"{pool.band}.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        pool.close()
    assert SlotPool(V1).band is None


def test_the_gateways_own_device_nodes(tmp_path: Path) -> None:
    """null, zero, urandom: character devices 1:3, 1:5, 1:9, mode 0666 whatever
    the umask; made again (replaced) at every start."""
    os.chmod(tmp_path, 0o711)  # noqa: S103
    old = os.umask(0o077)
    try:
        dev = make_devices(tmp_path)
        assert dev == tmp_path / "dev"
        assert make_devices(tmp_path) == dev
    finally:
        os.umask(old)
    got = {}
    for p in sorted(dev.iterdir()):
        st = os.lstat(p)
        got[p.name] = (stat.S_ISCHR(st.st_mode), stat.S_IMODE(st.st_mode),
                       os.major(st.st_rdev), os.minor(st.st_rdev), st.st_uid)
    assert got == {"null": (True, 0o666, 1, 3, 0), "urandom": (True, 0o666, 1, 9, 0),
                   "zero": (True, 0o666, 1, 5, 0)}


def test_the_derived_policy_binds_no_host_device() -> None:
    text = without_host_devices(REPO_CFG.read_text())
    assert 'src: "/dev/' not in text
    assert text.count("mount {") == REPO_CFG.read_text().count("mount {") - 3


# ---- the proxy's connection budget, without a jail ------------------------------------

async def test_past_the_connection_budget_the_gateway_stops_accepting() -> None:
    """A burst of 4 then 10/s: 30 connections made at once are not all
    accepted; the rest wait in the backlog and are accepted as tokens come
    back; a new invocation gets a new budget at once, and its calls work."""
    root = Path(tempfile.mkdtemp(prefix="nsfaas-p-", dir="/tmp"))
    methods = Methods()
    srv = HostProxy(root, methods, connect_rate_per_s=10.0, connect_burst=4)
    await srv.start()
    socks: list[socket.socket] = []
    try:
        srv.begin(OLD)
        for _ in range(30):  # within the backlog (32): every connect completes at once
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(srv.path))
            socks.append(s)
        await asyncio.sleep(0.05)
        assert srv.accepted == 4
        await asyncio.sleep(0.5)
        assert 7 <= srv.accepted <= 11, srv.accepted  # 4 + ~10/s
        srv.end()
        srv.begin(NEW)  # closes what waits, and a new budget
        before = srv.accepted
        with client(srv) as s:
            s.sendall(frame())
            got = await asyncio.to_thread(reply, s)
        assert got is not None and got["ok"], got
        assert srv.accepted == before + 1
        assert methods.seen == [("inv-new", "echo")]
    finally:
        for s in socks:
            s.close()
        await srv.aclose()
        shutil.rmtree(root, ignore_errors=True)
