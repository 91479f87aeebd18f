"""cgroup v1 / v2 detection, parent cgroups, per-jail counters and cleanup.

nsjail creates one cgroup per jail, ``NSJAIL.<pid>`` (pid = the jailed
process's host pid), under the parent we give it, applies the limits and
removes it when the jail ends. We create the parents, read the jail's OOM and
pids counters while it lives (to tell an OOM kill from any other SIGKILL), and
remove what nsjail could not (nsjail itself SIGKILLed).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import JailUnavailable

V1_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu")


@dataclass(frozen=True, slots=True)
class Cgroups:
    """Where the jails' cgroups live. ``version`` is 1 or 2."""

    version: Literal[1, 2]
    parent: str  # name of our parent cgroup (v1: under each controller mount)
    root: Path  # v1: /sys/fs/cgroup (controllers below); v2: our parent cgroup dir

    def mount(self, controller: str) -> Path:
        return self.root / controller

    def jail_dirs(self, pid: int) -> list[Path]:
        name = f"NSJAIL.{pid}"
        if self.version == 2:
            return [self.root / name]
        return [self.root / c / self.parent / name for c in CONTROLLERS]

    def counters(self, pid: int) -> dict[str, int]:
        """OOM kills and pids-limit hits of one live jail (0 when unreadable)."""
        out = {"oom_kill": 0, "pids_max": 0}
        if self.version == 2:
            mem = self.root / f"NSJAIL.{pid}" / "memory.events"
            pids = self.root / f"NSJAIL.{pid}" / "pids.events"
        else:
            mem = self.root / "memory" / self.parent / f"NSJAIL.{pid}" / "memory.oom_control"
            pids = self.root / "pids" / self.parent / f"NSJAIL.{pid}" / "pids.events"
        out["oom_kill"] = _read_key(mem, "oom_kill")
        out["pids_max"] = _read_key(pids, "max")
        return out

    def remove_jail(self, pid: int) -> None:
        for d in self.jail_dirs(pid):
            with contextlib.suppress(OSError):
                d.rmdir()

    def sweep(self) -> int:
        """Remove empty ``NSJAIL.*`` cgroups whose jail process no longer exists."""
        removed = 0
        parents = (
            [self.root] if self.version == 2 else [self.root / c / self.parent for c in CONTROLLERS]
        )
        for parent in parents:
            with contextlib.suppress(OSError):
                for d in parent.iterdir():
                    if not d.name.startswith("NSJAIL."):
                        continue
                    pid = d.name.removeprefix("NSJAIL.")
                    if pid.isdigit() and Path(f"/proc/{pid}").exists():
                        continue
                    with contextlib.suppress(OSError):
                        d.rmdir()
                        removed += 1
        return removed

    def nsjail_flags(self) -> list[str]:
        if self.version == 2:
            return ["--use_cgroupv2", "--cgroupv2_mount", str(self.root)]
        flags = []
        for c in CONTROLLERS:
            opt = "mem" if c == "memory" else c  # nsjail's flag names
            flags += [f"--cgroup_{opt}_mount", str(self.root / c)]
            flags += [f"--cgroup_{opt}_parent", self.parent]
        return flags


def _read_key(path: Path, key: str) -> int:
    try:
        text = path.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _v2_root() -> Path | None:
    for cand in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        ctl = cand / "cgroup.controllers"
        if ctl.exists():
            have = set(ctl.read_text().split())
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
    return Cgroups(version=1, parent=parent, root=V1_ROOT)


def _setup_v2(root: Path, parent: str) -> Cgroups:
    want = "+memory +pids +cpu"
    d = root / parent
    try:
        (root / "cgroup.subtree_control").write_text(want)
        d.mkdir(exist_ok=True)
        (d / "cgroup.subtree_control").write_text(want)
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


def cpu_count() -> int:
    return os.cpu_count() or 1
