"""cgroup v1 / v2: detection, our parent cgroup, and the jails' reusable slots.

Every jail runs in a slot cgroup under our parent (``nsfaas``): memory (with
swap capped at zero), pids and a CPU share. The gateway, not nsjail, manages
them: see SlotPool for why, and docs/jail.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import signal
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import JailUnavailable

V1_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000  # the CFS bandwidth period of every slot


@dataclass(frozen=True, slots=True)
class Cgroups:
    """Where the jails' cgroups live. ``version`` is 1 or 2."""

    version: Literal[1, 2]
    parent: str  # name of our parent cgroup (v1: under each controller mount)
    root: Path  # v1: /sys/fs/cgroup (controllers below); v2: our parent cgroup dir


SLOT_PREFIX = "slot-"
# Every throttled jail's slot (the penalty box, SlotLimits.boxed) lives in this
# one cgroup under our parent, whose CPU quota caps them all together: each
# throttled function has its own quota too, but ten of them would otherwise
# take ten times as much, and a tenant can deploy functions by the dozen.
BOX = "penalty-box"
# Outside uids of jails: each slot (so each live jail) gets its own, so no two
# jails share a uid's kernel counters (pipe buffers, epoll watches, fds in
# flight) or its signal/ptrace rights. A pool takes a random band of 65,536 in
# 0x70000000-0x7F9FFFFF: above systemd's container range (which ends at
# 0x6FFFFFFF), below its foreign range (0x7FFE0000). docs/jail.md.
JAIL_UID_BASE = 0x70000000
JAIL_UID_BANDS = 4000
JAIL_UID_BAND = 65536
# Gateways on one host coordinate their bands: a pool holds an exclusive flock
# on <dir>/<band>.lock for its life. The first of these that is writable.
BAND_LOCK_DIRS = (Path("/run/nsfaas-uid-bands"), Path(tempfile.gettempdir()) / "nsfaas-uid-bands")


def is_jail_uid(uid: int) -> bool:
    """Could a process of this outside uid be a jail's (either uid scheme)?"""
    return uid == 65534 or JAIL_UID_BASE <= uid < JAIL_UID_BASE + JAIL_UID_BANDS * JAIL_UID_BAND
JAILS_CPU_SHARES = 512  # v1; a task of the gateway weighs 1024
JAILS_CPU_WEIGHT = 50  # v2; the default weight is 100
# A call that runs longer than LONG_CALL_S (see Worker) yields contended CPU to
# the short ones: its slot's weight is divided by this while it runs.
LONG_CALL_WEIGHT_DIVISOR = 32


@dataclass(frozen=True, slots=True)
class SlotLimits:
    memory_bytes: int
    pids: int
    cpu_ms_per_sec: int
    boxed: bool = False  # in the penalty box (BOX), which all throttled slots share


def cpu_weight(cpu_ms_per_sec: int, *, version: int) -> int:
    """A slot's share of contended CPU, in proportion to its quota.

    The quota caps a jail over a 100 ms period, but within the period a jail
    with CPU left competes as an equal: a throttled function (the penalty box,
    100 ms/s) would still run its 10 ms bursts against everyone's calls. With
    weights in proportion to quotas it yields to them while they need the CPU.
    v1 ``cpu.shares`` (default 1024 = one core), v2 ``cpu.weight`` (default 100).
    """
    if version == 2:
        return max(1, min(10000, round(100 * cpu_ms_per_sec / 1000)))
    return max(2, round(1024 * cpu_ms_per_sec / 1000))


def long_call_weight(cpu_ms_per_sec: int, *, version: int) -> int:
    """The weight of a slot whose call has run long: a small fraction of its
    usual one, so under contention it runs on what the short calls leave."""
    usual = cpu_weight(cpu_ms_per_sec, version=version)
    return max(1 if version == 2 else 2, usual // LONG_CALL_WEIGHT_DIVISOR)


class SlotPool:
    """Reusable cgroups, one per live jail, created by us instead of by nsjail.

    nsjail's own cgroup handling creates and removes a memory, pids and cpu
    cgroup for every jail; on cgroup v1 the memory cgroup's removal alone
    costs milliseconds with wide jitter. A slot is created once, configured
    with a handful of writes per jail, and reused. The jail enters it by
    inheritance: a tiny launcher writes its own pid into the slot's
    ``cgroup.procs`` and then execs nsjail (see command.launcher()). Counters
    (OOM kills, pids-limit hits) stay readable after the jail is gone.
    """

    def __init__(
        self,
        groups: Cgroups,
        uid_base: int = 0,
        *,
        band_locks: Path | None = None,
        box_cpu_ms_per_sec: int = 100,
    ) -> None:
        """`uid_base`: 0 leaves every jail the cfg's uid map (65534 for all);
        else each slot gets a uid of its own from a random band above it, one
        no other pool on this host holds (`band_locks`: the lock directory,
        default the first usable of BAND_LOCK_DIRS). `box_cpu_ms_per_sec`: the
        CPU quota of the penalty box, all boxed slots together (set when the
        first boxed slot is made; gateways on one host share the box, and the
        last one to make a slot sets it)."""
        self.groups = groups
        self.box_cpu_ms_per_sec = box_cpu_ms_per_sec
        self._band_fd: int | None = None
        self.band: int | None = None
        if uid_base:
            self.band, self._band_fd = _lock_band(band_locks)
        self._uid0 = uid_base + self.band * JAIL_UID_BAND if self.band is not None else 0
        self._uids: dict[str, int] = {}  # slot -> outside uid, unique among existing slots
        self._free: list[str] = []
        self._free_boxed: list[str] = []
        self._next = 0
        self._naming = threading.Lock()
        # Unique per pool: several pools (gateways, tests) may share a machine.
        self._prefix = f"{SLOT_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-"
        self.busy: set[str] = set()
        # Counters are read twice per invocation: their files stay open (pread
        # at 0 regenerates a cgroup file) instead of an open/read/close each time.
        self._counter_fds: dict[str, tuple[int, int]] = {}
        # What each slot is set to: a slot reused with the same limits needs no writes.
        self._limits: dict[str, SlotLimits] = {}
        self._long: dict[str, SlotLimits] = {}  # slots at their long-call weight

    def dirs(self, name: str) -> list[Path]:
        if self.groups.version == 2:
            return [self.groups.root / name]
        return [self.groups.root / c / self.groups.parent / name for c in CONTROLLERS]

    def procs_files(self, name: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs(name)]

    def acquire(self, limits: SlotLimits | None) -> str:
        """A free slot configured for ``limits`` (blocking sysfs writes; call from a thread).
        None leaves it unconfigured, for ``configure`` later (never a boxed one)."""
        boxed = limits is not None and limits.boxed
        free = self._free_boxed if boxed else self._free
        name = free.pop() if free else self._create(boxed)
        try:
            if limits is not None:
                self._configure(name, limits)
        except OSError:
            self._remove(name)  # e.g. removed under us: start over with a new one
            name = self._create(boxed)
            if limits is not None:
                self._configure(name, limits)
        self.busy.add(name)
        return name

    def acquire_free(self, limits: SlotLimits | None) -> str | None:
        """A free slot, configured, or None: a few small sysfs writes to an
        empty cgroup, cheap enough for the event loop (mkdir is not)."""
        free = self._free_boxed if limits is not None and limits.boxed else self._free
        if not free:
            return None
        name = free.pop()
        try:
            if limits is not None:
                self._configure(name, limits)
        except OSError:
            self._remove(name)
            return None
        self.busy.add(name)
        return name

    def configure(self, name: str, limits: SlotLimits) -> None:
        """Set a busy slot's limits (in or out of the box, as the slot was made)."""
        if limits.boxed != self.boxed(name):
            raise OSError(errno.EINVAL, f"slot {name} is {'' if self.boxed(name) else 'not '}boxed")
        self._configure(name, limits)

    @staticmethod
    def boxed(name: str) -> bool:
        return name.startswith(BOX + "/")

    def set_long_call(self, name: str, long: bool) -> None:
        """Lower a slot's CPU weight while its call runs long, or restore it.

        The quota still caps the slot; the weight only decides who runs first
        when the CPUs are contended. A slot whose weight is not its limits' one
        is forgotten as configured, so the next ``configure`` writes it again
        even if a restore failed.
        """
        lim = self._limits.get(name) if long else self._long.pop(name, None)
        if lim is None:
            return
        v = self.groups.version
        weight = (long_call_weight if long else cpu_weight)(lim.cpu_ms_per_sec, version=v)
        if long:
            self._limits.pop(name, None)
            self._long[name] = lim
        if v == 2:
            _write(self.groups.root / name / "cpu.weight", weight)
        else:
            _write(self.groups.root / "cpu" / self.groups.parent / name / "cpu.shares", weight)
        if not long:
            self._limits[name] = lim

    def kill_all_but(
        self, name: str, keep: set[int], *, unless: Callable[[], bool] | None = None
    ) -> int:
        """SIGKILL every process in a slot except ``keep``; returns how many.

        Each pid is pinned with a pidfd and checked to still be in this slot
        before the signal, so a pid reused after its process left cannot be hit.
        ``unless`` is asked once the slot's processes are listed: True kills none
        (whatever made the kill unnecessary happened before the listing).
        """
        killed = 0
        pids = set(self.pids_in(name)) - keep
        if unless is not None and unless():
            return 0
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # gone already
            try:
                with open(f"/proc/{pid}/cgroup") as f:
                    if f"/{self.groups.parent}/{name}\n" not in f.read():
                        continue
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
            finally:
                os.close(pidfd)
        return killed

    def _create(self, boxed: bool = False) -> str:
        # acquire runs in threads (mkdir is slow): two at once must never get
        # one name, or two jails would share a cgroup and its limits.
        if boxed:
            self._make_box()
        with self._naming:
            self._next += 1
            name = f"{BOX + '/' if boxed else ''}{self._prefix}{self._next}"
            if self._uid0:
                taken = set(self._uids.values())
                uid = next(u for u in range(self._uid0, self._uid0 + JAIL_UID_BAND + 1)
                           if u not in taken)
                if uid == self._uid0 + JAIL_UID_BAND:
                    raise OSError(errno.EMFILE, "every outside uid of this pool is in use")
                self._uids[name] = uid
        for d in self.dirs(name):
            d.mkdir(exist_ok=True)
        return name

    def _box_dirs(self) -> list[Path]:
        if self.groups.version == 2:
            return [self.groups.root / BOX]
        return [self.groups.root / c / self.groups.parent / BOX for c in CONTROLLERS]

    def _make_box(self) -> None:
        """The penalty box: a cgroup whose quota all boxed slots share (and,
        under contention, one slot's weight for all of them together)."""
        quota = max(10, self.box_cpu_ms_per_sec) * 100  # the kernel's least: 1 ms
        weight = cpu_weight(self.box_cpu_ms_per_sec, version=self.groups.version)
        for d in self._box_dirs():
            d.mkdir(exist_ok=True)
        if self.groups.version == 2:
            d = self.groups.root / BOX
            _write(d / "cgroup.subtree_control", "+memory +pids +cpu")
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            _write(d / "cpu.weight", weight)
            return
        cpu = self.groups.root / "cpu" / self.groups.parent / BOX
        _write(cpu / "cpu.cfs_period_us", CPU_PERIOD_US)
        _write(cpu / "cpu.cfs_quota_us", quota)
        _write(cpu / "cpu.shares", weight)

    def _configure(self, name: str, lim: SlotLimits) -> None:
        if self._limits.get(name) == lim:
            return
        self._limits.pop(name, None)  # unknown until every write below has landed
        self._long.pop(name, None)
        self._write_limits(name, lim)
        self._limits[name] = lim

    def _write_limits(self, name: str, lim: SlotLimits) -> None:
        quota = lim.cpu_ms_per_sec * 100  # µs per 100 ms period
        if self.groups.version == 2:
            d = self.groups.root / name
            _write(d / "memory.max", lim.memory_bytes)
            swap = d / "memory.swap.max"
            if swap.exists():  # absent on kernels without swap (nothing to cap)
                _write(swap, 0)
            _write(d / "pids.max", lim.pids)
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            _write(d / "cpu.weight", cpu_weight(lim.cpu_ms_per_sec, version=2))
            return
        mem = self.groups.root / "memory" / self.groups.parent / name
        # memsw must stay >= the memory limit at every step: open it, set, close.
        memsw = mem / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            _write(memsw, -1)
        _write(mem / "memory.limit_in_bytes", lim.memory_bytes)
        if memsw.exists():
            _write(memsw, lim.memory_bytes)  # memory + swap == memory: no swap
        _write(self.groups.root / "pids" / self.groups.parent / name / "pids.max", lim.pids)
        cpu = self.groups.root / "cpu" / self.groups.parent / name
        _write(cpu / "cpu.cfs_period_us", CPU_PERIOD_US)
        _write(cpu / "cpu.cfs_quota_us", quota)
        _write(cpu / "cpu.shares", cpu_weight(lim.cpu_ms_per_sec, version=1))

    def counters(self, name: str) -> dict[str, int]:
        """Cumulative OOM kills and pids-limit hits of a slot (compare before/after)."""
        fds = self._counter_fds.get(name)
        if fds is None:
            if self.groups.version == 2:
                d = self.groups.root / name
                files = (d / "memory.events", d / "pids.events")
            else:
                base = self.groups.root
                files = (
                    base / "memory" / self.groups.parent / name / "memory.oom_control",
                    base / "pids" / self.groups.parent / name / "pids.events",
                )
            try:
                oom = os.open(files[0], os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return {"oom_kill": 0, "pids_max": 0}
            try:
                pids = os.open(files[1], os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                os.close(oom)
                return {"oom_kill": 0, "pids_max": 0}
            fds = self._counter_fds[name] = (oom, pids)
        return {"oom_kill": _pread_key(fds[0], "oom_kill"), "pids_max": _pread_key(fds[1], "max")}

    def cpu_ms(self, name: str) -> float | None:
        """CPU the slot has used, in ms, to compare two readings; None if
        unknown. v2: the cgroup's own usage. v1, whose slots have no cpuacct:
        an upper bound, 100 ms per CFS period in which the slot ran at all
        (``nr_periods`` counts only periods with CPU use, so it stands still
        while the slot's processes wait). Summing /proc/<pid>/stat over the
        slot's processes missed children reaped by a parent that ignores
        SIGCHLD: their CPU reaches no total."""
        if self.groups.version == 2:
            path, key, scale = self.groups.root / name / "cpu.stat", "usage_usec", 0.001
        else:
            path = self.groups.root / "cpu" / self.groups.parent / name / "cpu.stat"
            key, scale = "nr_periods", CPU_PERIOD_US / 1000.0
        try:
            text = path.read_text()
        except OSError:
            return None
        for line in text.splitlines():
            field, _, value = line.partition(" ")
            if field == key and value.strip().isdigit():
                return int(value) * scale
        return None

    def pids_in(self, name: str) -> list[int]:
        out: list[int] = []
        for f in self.procs_files(name):
            with contextlib.suppress(OSError, ValueError):
                out += [int(p) for p in f.read_text().split()]
        return out

    def release(self, name: str) -> None:
        """Back to the free list once empty; a slot that still holds a process
        (it never should) is emptied by SIGKILL first and otherwise removed later."""
        self.busy.discard(name)
        for pid in self.pids_in(name):
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        if self.pids_in(name):
            return  # the sweep at the next start-up removes it
        (self._free_boxed if self.boxed(name) else self._free).append(name)

    def uid(self, name: str) -> int | None:
        """The slot's own outside uid, or None (the cfg's shared mapping)."""
        return self._uids.get(name)

    def _remove(self, name: str) -> None:
        # Its uid is free again only now: a slot that still held a process
        # (release() keeps it) is never removed, so its uid is never reused.
        with self._naming:
            self._uids.pop(name, None)
        self._limits.pop(name, None)
        self._long.pop(name, None)
        for fd in self._counter_fds.pop(name, ()):
            os.close(fd)
        for d in self.dirs(name):
            with contextlib.suppress(OSError):
                d.rmdir()

    def close(self) -> None:
        """Remove every free slot (graceful shutdown), and let the uid band go."""
        for free in (self._free, self._free_boxed):
            while free:
                self._remove(free.pop())
        for d in self._box_dirs():
            with contextlib.suppress(OSError):  # another gateway's boxed slots in it
                d.rmdir()
        fd, self._band_fd = self._band_fd, None
        if fd is not None:
            os.close(fd)  # the flock goes with it

    def sweep(self) -> int:
        """Remove empty slots of dead gateways and NSJAIL.* cgroups left by nsjail."""
        removed = 0
        parents = (
            [self.groups.root]
            if self.groups.version == 2
            else [self.groups.root / c / self.groups.parent for c in CONTROLLERS]
        )
        for parent in parents + self._box_dirs():
            with contextlib.suppress(OSError):
                for d in parent.iterdir():
                    if not d.is_dir() or not d.name.startswith((SLOT_PREFIX, "NSJAIL.")):
                        continue
                    if d.name.startswith(SLOT_PREFIX):
                        owner = d.name.removeprefix(SLOT_PREFIX).split("-", 1)[0]
                        if owner.isdigit() and Path(f"/proc/{owner}").exists():
                            continue  # a live gateway's slot, free or busy

                    with contextlib.suppress(OSError):
                        d.rmdir()
                        removed += 1
        return removed


def _lock_dir(explicit: Path | None) -> Path | None:
    """A directory of ours (not a symlink, owned by this uid) for band locks."""
    for d in (explicit,) if explicit is not None else BAND_LOCK_DIRS:
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(d)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            return d
    return None


def _lock_band(explicit: Path | None) -> tuple[int, int | None]:
    """A uid band no other pool on this host holds, and the fd of its lock
    (held for the pool's life: the flock goes when the fd, or the process,
    does). Bands are tried in random order. Without a usable lock directory,
    a random band and None (and the collision risk of before)."""
    d = _lock_dir(explicit)
    if d is None:
        return secrets.randbelow(JAIL_UID_BANDS), None
    bands = list(range(JAIL_UID_BANDS))
    secrets.SystemRandom().shuffle(bands)
    for band in bands:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(d / f"{band}.lock", flags, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held by another pool
            continue
        return band, fd
    raise JailUnavailable(f"every outside-uid band is held by another pool ({d})")


def _write(path: Path, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _pread_key(fd: int, key: str) -> int:
    try:
        text = os.pread(fd, 4096, 0).decode()
    except (OSError, UnicodeDecodeError):
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _own_v2_cgroup(mount: Path) -> Path:
    """The cgroup this process lives in (``0::/path`` in /proc/self/cgroup):
    under systemd ``Delegate=yes`` or in a container, that subtree is ours."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return mount
    for line in lines:
        if line.startswith("0::"):
            rel = line[3:].strip().lstrip("/")
            return mount / rel if rel else mount
    return mount


def _v2_root() -> Path | None:
    """Our own cgroup v2 directory, if memory, pids and cpu are available in it."""
    for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if not (mount / "cgroup.controllers").exists():
            continue
        own = _own_v2_cgroup(mount)
        for cand in (own, mount):
            with contextlib.suppress(OSError):
                have = set((cand / "cgroup.controllers").read_text().split())
                if {"memory", "pids", "cpu"} <= have:
                    return cand
    return None


def setup(parent: str = "nsfaas", *, prefer: Literal["auto", "v1", "v2"] = "auto") -> Cgroups:
    """Detect the cgroup version and create our parent cgroups.

    Raises JailUnavailable naming what is missing: a jail without memory and
    pids limits is not a jail we run customer code in.
    """
    v1_ok = all((V1_ROOT / c / "cgroup.procs").exists() for c in CONTROLLERS)
    v2 = _v2_root()
    if prefer != "v1" and v2 is not None and (prefer == "v2" or not v1_ok):
        return _setup_v2(v2, parent)
    if v1_ok and prefer != "v2":
        return _setup_v1(parent)
    raise JailUnavailable(
        "no usable cgroups: need cgroup v1 controllers memory, pids and cpu mounted under "
        "/sys/fs/cgroup/<controller>, or a cgroup v2 hierarchy whose cgroup.controllers lists "
        "memory, pids and cpu. In a container, run with --privileged or --cgroupns=host and a "
        "writable /sys/fs/cgroup (see docs/deploy.md)."
    )


def _setup_v1(parent: str) -> Cgroups:
    for c in CONTROLLERS:
        d = V1_ROOT / c / parent
        try:
            d.mkdir(exist_ok=True)
        except OSError as exc:
            raise JailUnavailable(
                f"cannot create cgroup {d}: {exc.strerror}. Run the gateway as root, or "
                f"delegate {V1_ROOT / c} to its user."
            ) from None
    # All jails together weigh half of one gateway task: under contention the
    # gateway (which answers every caller) runs first; idle CPU is still theirs.
    with contextlib.suppress(OSError):
        (V1_ROOT / "cpu" / parent / "cpu.shares").write_text(str(JAILS_CPU_SHARES))
    return Cgroups(version=1, parent=parent, root=V1_ROOT)


def _setup_v2(root: Path, parent: str) -> Cgroups:
    want = "+memory +pids +cpu"
    d = root / parent
    try:
        try:
            (root / "cgroup.subtree_control").write_text(want)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            # "No internal processes": a cgroup that hands controllers to its
            # children may not hold processes itself. Move ours to a leaf.
            leaf = root / "gateway"
            leaf.mkdir(exist_ok=True)
            for pid in (root / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (leaf / "cgroup.procs").write_text(pid)
            (root / "cgroup.subtree_control").write_text(want)
        d.mkdir(exist_ok=True)
        (d / "cgroup.subtree_control").write_text(want)
        with contextlib.suppress(OSError):
            (d / "cpu.weight").write_text(str(JAILS_CPU_WEIGHT))  # see _setup_v1
    except OSError as exc:
        raise JailUnavailable(
            f"cannot prepare cgroup v2 parent {d}: {exc.strerror}. The gateway needs a delegated "
            f"cgroup v2 subtree with memory, pids and cpu enabled (systemd: Delegate=yes; "
            f"containers: a private cgroup namespace with /sys/fs/cgroup writable)."
        ) from None
    return Cgroups(version=2, parent=parent, root=d)


def children_of(pid: int) -> list[int]:
    """Direct children of a host process (the jailed pid 1 of an nsjail)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
