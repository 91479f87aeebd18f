"""Build the nsjail command line: the base policy plus per-jail flags. Pure.

Flags come *after* ``--config``: nsjail reads its arguments in order and the
later value wins, and repeated mount flags add mounts. Only the flags below
are ever produced; nothing a tenant sends reaches this list unvalidated
(entrypoint and paths are checked by the caller, limits are typed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ._interp import Interpreter
from .cgroups import Cgroups, SlotLimits, SlotPool
from .limits import Limits

if TYPE_CHECKING:
    from .launcher import Launchers

JAIL_ID = 65534  # the only uid and gid inside a jail (nobody/nogroup)
RUNTIME_DST = "/opt/nsfaas"
CODE_DST = "/function"
PROXY_DST = "/run/nsfaas"
# The jail's cgroup also holds nsjail (the launcher becomes nsjail) and the
# runtime's zygote, on top of the function's own processes and threads.
RUNTIME_PIDS = 2
# nsjail's and the zygote's resident memory, on top of the function's limit.
RUNTIME_MEMORY_MB = 16
# A warm worker lives for many invocations; each child gets its own limits.
WARM_LIFETIME_S = 24 * 3600


@dataclass(frozen=True, slots=True)
class JailConfig:
    """Host-side facts that are the same for every jail, built once at start-up."""

    nsjail: Path
    base_cfg: Path
    interpreter: Interpreter
    runtime_dir: Path  # host dir holding bootstrap.py, _frames.py, nsfaas.py
    cgroups: Cgroups
    slots: SlotPool
    shell: Path = Path("/bin/sh")
    launchers: Launchers | None = None  # prepared, already-joined launchers (cold starts)
    # base_cfg has no uidmap/gidmap: every jail must be given its own uid
    # (build_command refuses one without: nsjail would map the caller, root).
    per_jail_uid: bool = False
    # The gateway's own null, zero and urandom nodes (runner.make_devices),
    # bound read-only over /dev/*; base_cfg then has no binds of the host's
    # (without_host_devices). None: the cfg's binds of the host's nodes.
    dev_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class JailSpec:
    """One jail: which code, which entrypoint, which limits, once or warm."""

    code_dir: Path
    entrypoint: str
    limits: Limits
    mode: Literal["once", "warm"] = "once"
    proxy_dir: Path | None = None


def nsjail_time_limit(spec: JailSpec) -> int:
    """nsjail's own backstop, derived from the function's one timeout.

    The gateway's deadline (timeout_s) fires first; nsjail's time_limit
    (whole seconds, 0 would mean none) only catches a gateway that failed to.
    """
    if spec.mode == "warm":
        return WARM_LIFETIME_S
    return math.ceil(spec.limits.timeout_s) + 2


def slot_limits(spec: JailSpec) -> SlotLimits:
    return slot_limits_for(spec.limits)


def slot_limits_for(lim: Limits) -> SlotLimits:
    return SlotLimits(
        memory_bytes=(lim.memory_mb + RUNTIME_MEMORY_MB) * 1024 * 1024,
        pids=lim.pids + RUNTIME_PIDS,
        cpu_ms_per_sec=lim.cpu_ms_per_sec,
        boxed=lim.penalty_box,
    )


# The runtime is imported as a module (a script run as __main__ is always
# compiled from source; a module's precompiled bytecode is used).
BOOT = (
    f"import sys; sys.path.insert(0, {RUNTIME_DST!r}); import bootstrap; "
    "sys.exit(bootstrap.main(sys.argv))"
)


# Joins the jail's cgroup(s) by writing its own pid, then becomes nsjail, so
# every process of the jail is born inside the cgroup. Fixed text; the paths
# and the nsjail command are positional arguments, never interpolated.
LAUNCHER = 'echo $$ > "$1" && echo $$ > "$2" && echo $$ > "$3" && shift 3 && exec "$@"'


# The device nodes a jail gets (/dev/<name>): (major, minor) of each.
DEVICES = {"null": (1, 3), "zero": (1, 5), "urandom": (1, 9)}
_HOST_DEVICE_BIND = re.compile(
    r'^[ \t]*mount\s*\{\s*src:\s*"/dev/(?:null|zero|urandom)"[^}]*\}[^\n]*\n?', re.MULTILINE
)


def without_host_devices(cfg_text: str) -> str:
    """The base policy minus its binds of the host's /dev/null, /dev/zero and
    /dev/urandom, for jails that get the gateway's own nodes on the command
    line instead (a bind over a bind would work, but keep the host's nodes
    mounted underneath)."""
    return _HOST_DEVICE_BIND.sub("", cfg_text)


_ID_MAP = re.compile(r"^[ \t]*[ug]idmap\s*\{[^}]*\}[^\n]*\n?", re.MULTILINE)


def without_id_maps(cfg_text: str) -> str:
    """The base policy minus its uidmap/gidmap entries, for jails whose ids are
    mapped per jail on the command line (nsjail would apply both, and the
    kernel refuses a second mapping of the same inside id)."""
    return _ID_MAP.sub("", cfg_text)


def build_command(
    config: JailConfig,
    spec: JailSpec,
    *,
    ctl_fd: int,
    log_fd: int,
    cgroup_procs: Sequence[Path],
    uid: int | None = None,
) -> list[str]:
    """`uid`: the jail's own outside uid (its slot's), mapped to 65534 inside;
    None keeps the base policy's own uidmap/gidmap."""
    if config.per_jail_uid and uid is None:
        raise ValueError("this policy has no uid map: the jail needs its own uid")
    lim = spec.limits
    interp = config.interpreter
    procs = [str(p) for p in cgroup_procs]
    procs += procs[-1:] * (3 - len(procs))  # v2 has one file: write it three times
    cmd = [
        str(config.shell),
        "-c",
        LAUNCHER,
        "nsfaas-launch",
        *procs[:3],
        str(config.nsjail),
        "--config",
        str(config.base_cfg),
        "--log_fd",
        str(log_fd),
        "--time_limit",
        str(nsjail_time_limit(spec)),
        # The zygote's own RLIMIT_CPU; each child lowers it to lim.effective_cpu_s.
        "--rlimit_cpu",
        "inf" if spec.mode == "warm" else str(lim.effective_cpu_s + 2),
        "--rlimit_fsize",
        str(lim.file_size_mb),
        "--rlimit_nofile",
        str(lim.open_files),
    ]
    if uid is not None:
        cmd += ["--user", f"{JAIL_ID}:{uid}:1", "--group", f"{JAIL_ID}:{uid}:1"]
    for src, dst in interp.binds:
        cmd += ["--bindmount_ro", f"{src}:{dst}"]
    for target, link in interp.symlinks:
        cmd += ["--symlink", f"{target}:{link}"]
    for hidden in interp.hidden:
        cmd += ["--mount", f"none:{hidden}:tmpfs:size=4096,nr_inodes=1,mode=0555"]
    if config.dev_dir is not None:
        for name in DEVICES:
            cmd += ["--bindmount_ro", f"{config.dev_dir / name}:/dev/{name}"]
    # The function's own /tmp size and inode caps, over the cfg's default /tmp
    # (nsjail mounts a command-line tmpfs nosuid, nodev and noexec as well).
    tmp_opts = f"size={lim.tmp_mb * 1024 * 1024},nr_inodes={lim.tmp_inodes},mode=1777"
    cmd += ["--mount", f"none:/tmp:tmpfs:{tmp_opts}"]
    cmd += ["--bindmount_ro", f"{config.runtime_dir}:{RUNTIME_DST}"]
    cmd += ["--bindmount_ro", f"{spec.code_dir}:{CODE_DST}"]
    if spec.proxy_dir is not None:
        cmd += ["--bindmount_ro", f"{spec.proxy_dir}:{PROXY_DST}"]
    cmd += ["--pass_fd", str(ctl_fd)]
    cmd += [
        "--",
        "/usr/bin/python3",
        "-I",
        "-S",
        "-B",
        "-c",
        BOOT,
        str(ctl_fd),
        spec.entrypoint,
        spec.mode,
        str(lim.request_bytes),
    ]
    return cmd
