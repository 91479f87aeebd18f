"""Hostile functions against the jail's filesystem: nothing of the host to read,
nothing outside the private /tmp to write, nothing left for the next invocation.

Each test runs cold (a fresh jail per call) and warm (one worker), asserts its
specific outcome and errno, then that the same code and a good function still work.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from jail import JailRunner, Limits
from tests.jailtest import Jail, body_json

REPO = Path(__file__).resolve().parents[2]

# Tries every way to see a path; returns the errno name of each attempt.
PROBE_PATHS = """
import errno, json, os

def attempt(fn):
    try:
        fn()
        return "OK"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def handler(request, ctx):
    out = {}
    for p in json.loads(request.body):
        out[p] = {
            "stat": attempt(lambda: os.stat(p)),
            "lstat": attempt(lambda: os.lstat(p)),
            "open": attempt(lambda: open(p, "rb").close()),
            "listdir": attempt(lambda: os.listdir(p)),
            "access": os.access(p, os.F_OK),
        }
    return out
"""


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    """A gateway data dir with secrets, readable by anyone on the host."""
    d = Path(tempfile.mkdtemp(prefix="nsfaas-data-", dir="/tmp"))
    os.chmod(d, 0o755)  # noqa: S103 (world-readable on purpose: only the jail must not see it)
    (d / "nsfaas.db").write_bytes(b"SQLite format 3\0secret tenant keys")
    (d / "blobs").mkdir()
    os.chmod(d / "nsfaas.db", 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _targets(kind: str, runner: JailRunner, data_dir: Path) -> list[str]:
    if kind == "etc_shadow":
        return ["/etc/shadow", "/etc/passwd", "/etc/hosts", "/etc", "/function/../etc/shadow",
                "/tmp/../etc/shadow", "/root", "/home", "/var", "/sys", "/sys/fs/cgroup"]
    if kind == "proc":
        return ["/proc/1/environ", "/proc/self/environ", "/proc/self/mountinfo",
                "/proc/1/root", "/proc", "/dev/shm", "/dev/mqueue", "/dev/pts", "/dev/tty"]
    if kind == "data_dir":
        return [str(data_dir), str(data_dir / "nsfaas.db"), str(runner.jail_dir),
                str(runner.jail_dir / "code"), str(runner.jail_dir / "runtime"),
                str(runner.jail_dir / "sock"), str(REPO / ".nsfaas"), "/opt/nsfaas/../../tmp"]
    assert kind == "source_tree"
    return [str(REPO), str(REPO / "jail" / "runner.py"), str(REPO / "nsjail.cfg"),
            str(REPO / "gateway"), str(REPO / ".venv"), "/work", "/usr/local",
            "/usr/lib/python3/dist-packages", "/usr/bin/env", "/bin/sh", "/usr/bin/nsjail"]


@pytest.mark.parametrize("kind", ["etc_shadow", "proc", "data_dir", "source_tree"])
async def test_host_files_are_not_there(jail: Jail, mode: str, runner: JailRunner,
                                        data_dir: Path, kind: str) -> None:
    paths = _targets(kind, runner, data_dir)
    fn = jail.function(PROBE_PATHS, mode)
    got = body_json(await fn(json.dumps(paths)))
    for p in paths:
        if p == "/opt/nsfaas/../../tmp":
            continue  # that is the jail's own /tmp: only the host's must not show
        assert got[p] == {"stat": "ENOENT", "lstat": "ENOENT", "open": "ENOENT",
                          "listdir": "ENOENT", "access": False}, (p, got[p])
    await fn.assert_recovers()


async def test_only_the_expected_tree_exists(jail: Jail, mode: str, runner: JailRunner) -> None:
    """No /proc, /sys, /etc: the root holds exactly what the runtime needs."""
    src = """
import os, sys

def handler(request, ctx):
    return {
        "root": sorted(os.listdir("/")),
        "dev": sorted(os.listdir("/dev")),
        "opt": sorted(os.listdir("/opt/nsfaas")),
        "pycache": sorted(n.split(".")[0] for n in os.listdir("/opt/nsfaas/__pycache__")),
        "function": sorted(os.listdir("/function")),
        "usr": sorted(os.listdir("/usr")),
        "usr_bin": sorted(os.listdir("/usr/bin")),
        "tmp": os.listdir("/tmp"),
        "lib": os.readlink("/lib") if os.path.islink("/lib") else "dir",
        "mountinfo": os.path.exists("/proc/self/mountinfo"),
        "site": os.listdir(os.path.join(os.path.dirname(os.__file__), "site-packages"))
                if os.path.isdir(os.path.join(os.path.dirname(os.__file__), "site-packages"))
                else None,
        "path": sys.path, "cwd": os.getcwd(), "env": dict(os.environ),
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()],
        "pid": os.getpid(), "ppid": os.getppid(),
    }
"""
    fn = jail.function(src, mode)
    got = body_json(await fn())
    assert got["root"] == ["dev", "function", "lib", "lib64", "opt", "tmp", "usr"]
    assert got["dev"] == ["null", "urandom", "zero"]
    assert got["opt"] == ["__pycache__", "_frames.py", "bootstrap.py", "nsfaas.py"]
    assert set(got["pycache"]) <= {"_frames", "bootstrap", "nsfaas"}, got["pycache"]
    assert got["function"] == ["__pycache__", "handler.py"]  # precompiled at deploy
    assert got["usr"] == ["bin", "lib"] or got["usr"] == ["bin", "lib", "lib64"]
    assert got["usr_bin"] == ["python3"]
    assert got["tmp"] == []
    assert got["lib"] == "usr/lib"
    assert got["mountinfo"] is False
    assert got["site"] in (None, [])  # the host's site-packages are hidden
    assert got["cwd"] == "/function"
    assert got["env"] == {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "random",
                          "LANG": "C.UTF-8"}
    assert got["ids"] == [65534, 65534, 65534, 65534, []]
    assert got["ppid"] == 1  # the zygote is pid 1 of the jail's own pid namespace
    assert got["pid"] < 100
    assert not any(p.startswith(("/work", str(runner.jail_dir))) for p in got["path"])
    await fn.assert_recovers()


async def test_the_proxy_dir_is_the_only_extra_and_read_only(jail: Jail, mode: str,
                                                              runner: JailRunner) -> None:
    proxy = runner.jail_dir / "sock" / f"t-{os.getpid()}-{mode}"
    proxy.mkdir(mode=0o755)
    try:
        src = """
import errno, os

def handler(request, ctx):
    try:
        open("/run/nsfaas/evil.sock", "w")
        made = "OK"
    except OSError as e:
        made = errno.errorcode[e.errno]
    return {"root": sorted(os.listdir("/")), "run": os.listdir("/run"),
            "made": made, "ro": bool(os.statvfs("/run/nsfaas").f_flag & os.ST_RDONLY)}
"""
        fn = jail.function(src, mode, proxy_dir=proxy)
        got = body_json(await fn())
        assert got == {"root": ["dev", "function", "lib", "lib64", "opt", "run", "tmp", "usr"],
                       "run": ["nsfaas"], "made": "EROFS", "ro": True}
        assert list(proxy.iterdir()) == []
        await fn.assert_recovers()
    finally:
        if jail.workers:
            await jail.aclose()
        shutil.rmtree(proxy, ignore_errors=True)


WRITE_EVERYWHERE = """
import errno, os

def name(e):
    return errno.errorcode.get(e.errno, str(e.errno))

def handler(request, ctx):
    created, opened, flags, dirs = {}, {}, {}, 0
    for top in ("/", "/dev", "/function", "/opt", "/usr", "/lib", "/lib64"):
        for root, subdirs, files in os.walk(top):
            if root == "/":
                subdirs[:] = [d for d in subdirs if d != "tmp"]
            dirs += 1
            try:
                os.close(os.open(os.path.join(root, ".nsfaas-w"), os.O_CREAT | os.O_WRONLY))
                created[root] = "OK"
            except OSError as e:
                created[root] = name(e)
            try:
                os.mkdir(os.path.join(root, ".nsfaas-d"))
                created[root + "/mkdir"] = "OK"
            except OSError as e:
                created[root + "/mkdir"] = name(e)
            st = os.statvfs(root)
            flags[root] = bool(st.f_flag & os.ST_RDONLY)
            for f in files[:3]:
                p = os.path.join(root, f)
                if p == "/dev/null":
                    continue
                try:
                    os.close(os.open(p, os.O_WRONLY | os.O_APPEND))
                    opened[p] = "OK"
                except OSError as e:
                    opened[p] = name(e)
                flags[p] = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    t = os.statvfs("/tmp").f_flag
    tmp = {"rdonly": bool(t & os.ST_RDONLY), "nosuid": bool(t & os.ST_NOSUID),
           "nodev": bool(t & os.ST_NODEV), "noexec": bool(t & os.ST_NOEXEC)}
    other = {}
    for label, f in (
        ("chmod_handler", lambda: os.chmod("/function/handler.py", 0o777)),
        ("rename_handler", lambda: os.rename("/function/handler.py", "/function/x.py")),
        ("unlink_python", lambda: os.unlink("/usr/bin/python3")),
        ("symlink_root", lambda: os.symlink("/tmp", "/evil")),
        ("truncate_bootstrap", lambda: os.truncate("/opt/nsfaas/bootstrap.py", 0)),
        ("utime_lib", lambda: os.utime("/usr/bin/python3")),
        ("mknod_dev", lambda: os.mknod("/tmp/evil-null", 0o666 | 0o020000, os.makedev(1, 3))),
        ("chown_tmp", lambda: os.chown("/tmp", 0, 0)),
    ):
        try:
            f()
            other[label] = "OK"
        except OSError as e:
            other[label] = name(e)
    return {"created": created, "opened": opened, "flags": flags, "dirs": dirs,
            "tmp": tmp, "other": other}
"""


async def test_nothing_outside_tmp_is_writable(jail: Jail, mode: str) -> None:
    fn = jail.function(WRITE_EVERYWHERE, mode)
    got = body_json(await fn())
    assert got["dirs"] > 50  # the walk did see the stdlib tree
    bad = {p: e for p, e in got["created"].items() if e != "EROFS"}
    assert bad == {}, bad  # every directory outside /tmp is on a read-only mount
    # Existing files cannot be opened for writing either. The two character
    # devices are the exception by design: the kernel does not apply a
    # read-only mount to device nodes, and writing to them is harmless
    # (discarded by /dev/zero, mixed into the pool without credit by urandom).
    devices = {"/dev/zero": "OK", "/dev/urandom": "OK"}
    bad = {p: e for p, e in got["opened"].items()
           if e not in ("EROFS", "EACCES") and devices.get(p) != e}
    assert bad == {}, bad
    assert {p: got["opened"][p] for p in devices} == devices
    # Every mount but /tmp (and the /dev/null node) is read-only.
    assert [p for p, ro in got["flags"].items() if not ro] == []
    assert got["tmp"] == {"rdonly": False, "nosuid": True, "nodev": True, "noexec": True}
    assert got["other"] == {
        "chmod_handler": "EROFS", "rename_handler": "EROFS", "unlink_python": "EROFS",
        "symlink_root": "EROFS", "truncate_bootstrap": "EACCES", "utime_lib": "EROFS",
        "mknod_dev": "EPERM",
        "chown_tmp": "EINVAL",  # uid 0 has no mapping in the jail's user namespace
    }
    await fn.assert_recovers()


async def test_tmp_is_noexec(jail: Jail, mode: str) -> None:
    src = """
import os, subprocess

def handler(request, ctx):
    with open("/tmp/run.sh", "w") as f:
        f.write("#!/usr/bin/python3\\nprint('ran')\\n")
    os.chmod("/tmp/run.sh", 0o755)
    try:
        subprocess.run(["/tmp/run.sh"], check=True)
        return "EXECUTED"
    except PermissionError as e:
        return {"error": type(e).__name__, "errno": e.errno}
"""
    fn = jail.function(src, mode)
    assert body_json(await fn()) == {"error": "PermissionError", "errno": errno.EACCES}
    await fn.assert_recovers()


async def test_tmp_is_size_and_inode_capped(jail: Jail, mode: str) -> None:
    src = """
import errno, os

def handler(request, ctx):
    out = {}
    try:  # one file over RLIMIT_FSIZE (4 MB here): EFBIG, not SIGXFSZ
        with open("/tmp/big", "wb") as f:
            for _ in range(5):
                f.write(b"x" * (1 << 20))
        out["fsize"] = "OK"
    except OSError as e:
        out["fsize"] = errno.errorcode[e.errno]
    os.unlink("/tmp/big")
    written = 0
    try:  # many files under the limit: the tmpfs fills up at 6 MB
        for i in range(10):
            with open(f"/tmp/f{i}", "wb") as f:
                for _ in range(3):
                    f.write(b"y" * (1 << 20))
                    written += 1
        out["size"] = "OK"
    except OSError as e:
        out["size"] = errno.errorcode[e.errno]
    out["written_mb"] = written
    for name in os.listdir("/tmp"):
        os.unlink("/tmp/" + name)
    made = 0
    try:  # more files than the tmpfs has inodes
        for i in range(1000):
            open(f"/tmp/i{i}", "w").close()
            made += 1
        out["inodes"] = "OK"
    except OSError as e:
        out["inodes"] = errno.errorcode[e.errno]
    out["made"] = made
    return out
"""
    limits = Limits(timeout_s=5, memory_mb=64, pids=16, tmp_mb=6, tmp_inodes=100,
                    file_size_mb=4)
    fn = jail.function(src, mode, limits=limits)
    got = body_json(await fn())
    assert got["fsize"] == "EFBIG"
    assert got["size"] == "ENOSPC" and 4 <= got["written_mb"] <= 6, got
    assert got["inodes"] == "ENOSPC" and 90 <= got["made"] < 100, got
    await fn.assert_recovers()


async def test_a_file_left_in_tmp_is_gone_next_time(jail: Jail, mode: str) -> None:
    src = """
import os, stat

def handler(request, ctx):
    if request.text() == "look":
        return {"tmp": sorted(os.listdir("/tmp"))}
    with open("/tmp/marker", "w") as f:
        f.write("left behind")
    os.makedirs("/tmp/deep/er/est")
    with open("/tmp/deep/er/est/f", "w") as f:
        f.write("x")
    os.makedirs("/tmp/locked/inner")
    open("/tmp/locked/inner/f", "w").close()
    os.chmod("/tmp/locked/inner", 0)
    os.chmod("/tmp/locked", 0)
    os.symlink("/function/handler.py", "/tmp/link")
    os.mkfifo("/tmp/fifo")
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind("/tmp/sock")
    fd = os.open("/tmp/held-open", os.O_CREAT | os.O_WRONLY)
    os.write(fd, b"held")
    return {"tmp": sorted(os.listdir("/tmp"))}
"""
    fn = jail.function(src, mode)
    first = body_json(await fn("leave"))
    assert first == {"tmp": ["deep", "fifo", "held-open", "link", "locked", "marker", "sock"]}
    worker = fn.worker
    second = await fn("look")
    assert body_json(second) == {"tmp": []}
    if mode == "warm":
        assert fn.worker is worker and fn.alive, "the second look must be on the same worker"
    await fn.assert_recovers()


async def test_a_tree_deeper_than_path_max_is_gone_next_time(jail: Jail, mode: str) -> None:
    """Built with dir_fd, 20 levels of 250-character names (over 5,000
    characters of path): the wipe between warm invocations used to walk by
    absolute path, fail with ENAMETOOLONG past 4,096 and leave the tree (and
    its secret) to the next invocation."""
    src = """
import os

def handler(request, ctx):
    if request.text() == "look":
        found = []
        fd = os.open("/tmp", os.O_RDONLY)
        while True:
            names = os.listdir(fd)
            found += names
            dirs = [n for n in names if n.startswith("d")]
            if not dirs:
                break
            fd = os.open(dirs[0], os.O_RDONLY, dir_fd=fd)
        return {"found": len(found)}
    fd = os.open("/tmp", os.O_RDONLY)
    for i in range(20):
        name = f"d{i:02d}" + "x" * 247
        os.mkdir(name, dir_fd=fd)
        fd = os.open(name, os.O_RDONLY, dir_fd=fd)
    secret = os.open("secret", os.O_CREAT | os.O_WRONLY, dir_fd=fd)
    os.write(secret, b"from the previous invocation")
    return {"built": 20}
"""
    fn = jail.function(src, mode)
    assert body_json(await fn("build")) == {"built": 20}
    worker = fn.worker
    assert body_json(await fn("look")) == {"found": 0}
    if mode == "warm":
        assert fn.worker is worker and fn.alive, "wiped, so the same worker goes on"
    await fn.assert_recovers()


async def test_markers_in_dev_shm_and_tmp(jail: Jail, mode: str) -> None:
    src = """
import errno, os

def handler(request, ctx):
    out = {}
    if request.text() == "look":
        out["tmp"] = os.path.exists("/tmp/nsfaas-marker")
        out["shm"] = os.path.exists("/dev/shm/nsfaas-marker")
        out["shm_dir"] = os.path.exists("/dev/shm")
        return out
    open("/tmp/nsfaas-marker", "w").close()
    for label, f in (
        ("shm_file", lambda: open("/dev/shm/nsfaas-marker", "w")),
        ("shm_mkdir", lambda: os.mkdir("/dev/shm")),
        ("dev_file", lambda: open("/dev/nsfaas-marker", "w")),
    ):
        try:
            f()
            out[label] = "OK"
        except OSError as e:
            out[label] = errno.errorcode[e.errno]
    try:
        from multiprocessing import shared_memory
        shared_memory.SharedMemory(name="nsfaas-marker", create=True, size=4096)
        out["posix_shm"] = "OK"
    except OSError as e:
        out["posix_shm"] = errno.errorcode[e.errno]
    return out
"""
    fn = jail.function(src, mode)
    got = body_json(await fn("leave"))
    assert got == {"shm_file": "ENOENT", "shm_mkdir": "EROFS", "dev_file": "EROFS",
                   "posix_shm": "ENOENT"}
    assert body_json(await fn("look")) == {"tmp": False, "shm": False, "shm_dir": False}
    if mode == "warm":
        assert fn.alive and fn.restarts == 0
    await fn.assert_recovers()


async def test_sysv_ipc_is_refused(jail: Jail, mode: str) -> None:
    """SysV IPC objects would live in the jail's IPC namespace, which a warm
    worker keeps across invocations: seccomp refuses every SysV IPC call, so
    there is nothing one invocation could leave for the next."""
    src = """
import ctypes, errno

libc = ctypes.CDLL(None, use_errno=True)
KEY = 0x4E534641
IPC_CREAT = 0o1000

def handler(request, ctx):
    out = {}
    for name, call in [
        ("shmget", lambda: libc.shmget(KEY, 4096, IPC_CREAT | 0o600)),
        ("shmget_private", lambda: libc.shmget(0, 4096, IPC_CREAT | 0o600)),
        ("msgget", lambda: libc.msgget(KEY, IPC_CREAT | 0o600)),
        ("semget", lambda: libc.semget(KEY, 1, IPC_CREAT | 0o600)),
        ("shmctl", lambda: libc.shmctl(0, 14, None)),  # IPC_INFO
        ("msgctl", lambda: libc.msgctl(0, 12, None)),
        ("semctl", lambda: libc.semctl(0, 0, 19, None)),
    ]:
        ctypes.set_errno(0)
        rc = call()
        out[name] = "OK" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
    return out
"""
    fn = jail.function(src, mode)
    got = body_json(await fn("try"))
    assert got == dict.fromkeys(
        ["shmget", "shmget_private", "msgget", "semget", "shmctl", "msgctl", "semctl"], "ENOSYS"
    )
    if mode == "warm":
        assert fn.alive and fn.restarts == 0
    await fn.assert_recovers()
