"""The nsjail command line jail/ builds, and the base policy nsjail.cfg itself."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from jail import JailConfig, JailRunner, JailSpec, Limits
from jail import build_command as _build_command
from jail._interp import Interpreter
from jail.cgroups import JAIL_UID_BASE, Cgroups, SlotLimits, SlotPool
from jail.command import BOOT, LAUNCHER, nsjail_time_limit, slot_limits, without_id_maps
from tests.jailtest import GOOD, Deploy, Jail, body_json, describe

REPO = Path(__file__).resolve().parents[2]
CFG = REPO / "nsjail.cfg"

INTERP = Interpreter(
    exe="/usr/bin/python3.11",
    version="3.11.7",
    binds=(
        ("/usr/bin/python3.11", "/usr/bin/python3"),
        ("/usr/lib/python3.11", "/usr/lib/python3.11"),
        ("/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
    ),
    symlinks=(("usr/lib", "/lib"), ("usr/lib64", "/lib64")),
    hidden=("/usr/lib/python3.11/site-packages",),
)
V1 = Cgroups(version=1, parent="nsfaas", root=Path("/sys/fs/cgroup"))
CONFIG = JailConfig(
    nsjail=Path("/opt/nsjail"),
    base_cfg=Path("/srv/nsjail.cfg"),
    interpreter=INTERP,
    runtime_dir=Path("/srv/jail/runtime"),
    cgroups=V1,
    slots=SlotPool(V1),
    shell=Path("/bin/sh"),
)
SLOT = "slot-1-abc-1"
V1_PROCS = [Path(f"/sys/fs/cgroup/{c}/nsfaas/{SLOT}/cgroup.procs") for c in ("memory", "pids", "cpu")]


def build_command(config: JailConfig, spec: JailSpec, *, ctl_fd: int, log_fd: int,
                  cgroup_procs: list[Path] = V1_PROCS) -> list[str]:
    return _build_command(config, spec, ctl_fd=ctl_fd, log_fd=log_fd, cgroup_procs=cgroup_procs)

LIMITS = Limits(timeout_s=2.5, memory_mb=96, pids=10, cpu_ms_per_sec=500, file_size_mb=4,
                open_files=50, request_bytes=1000)
SPEC = JailSpec(code_dir=Path("/srv/jail/code/abc"), entrypoint="handler:handler",
                limits=LIMITS, proxy_dir=Path("/srv/jail/sock/p1"))

GOLDEN = [
    # the launcher joins the slot's cgroups (v1: memory, pids, cpu), then becomes nsjail
    "/bin/sh", "-c",
    'echo $$ > "$1" && echo $$ > "$2" && echo $$ > "$3" && shift 3 && exec "$@"',
    "nsfaas-launch",
    "/sys/fs/cgroup/memory/nsfaas/slot-1-abc-1/cgroup.procs",
    "/sys/fs/cgroup/pids/nsfaas/slot-1-abc-1/cgroup.procs",
    "/sys/fs/cgroup/cpu/nsfaas/slot-1-abc-1/cgroup.procs",
    "/opt/nsjail",
    "--config", "/srv/nsjail.cfg",
    "--log_fd", "9",
    "--time_limit", "5",
    "--rlimit_cpu", "5",
    "--rlimit_fsize", "4",
    "--rlimit_nofile", "50",
    "--bindmount_ro", "/usr/bin/python3.11:/usr/bin/python3",
    "--bindmount_ro", "/usr/lib/python3.11:/usr/lib/python3.11",
    "--bindmount_ro",
    "/usr/lib/x86_64-linux-gnu/libc.so.6:/usr/lib/x86_64-linux-gnu/libc.so.6",
    "--symlink", "usr/lib:/lib",
    "--symlink", "usr/lib64:/lib64",
    "--mount", "none:/usr/lib/python3.11/site-packages:tmpfs:size=4096,nr_inodes=1,mode=0555",
    "--mount", "none:/tmp:tmpfs:size=16777216,nr_inodes=512,mode=1777",
    "--bindmount_ro", "/srv/jail/runtime:/opt/nsfaas",
    "--bindmount_ro", "/srv/jail/code/abc:/function",
    "--bindmount_ro", "/srv/jail/sock/p1:/run/nsfaas",
    "--pass_fd", "7",
    "--",
    # the runtime is imported as a module, so its precompiled bytecode is used
    "/usr/bin/python3", "-I", "-S", "-B", "-c",
    "import sys; sys.path.insert(0, '/opt/nsfaas'); import bootstrap; "
    "sys.exit(bootstrap.main(sys.argv))",
    "7", "handler:handler", "once", "1000",
]


def _flags(cmd: list[str]) -> list[tuple[str, str]]:
    """(flag, value) pairs of nsjail, from --config to --."""
    end = cmd.index("--")
    pairs = []
    i = cmd.index("--config")
    while i < end:
        assert cmd[i].startswith("--"), f"value without a flag at {i}: {cmd[i]!r}"
        pairs.append((cmd[i], cmd[i + 1]))
        i += 2
    return pairs


def test_golden_command() -> None:
    assert build_command(CONFIG, SPEC, ctl_fd=7, log_fd=9) == GOLDEN


def test_config_comes_first_so_every_per_jail_flag_overrides_it() -> None:
    cmd = build_command(CONFIG, SPEC, ctl_fd=7, log_fd=9)
    i = cmd.index("/opt/nsjail")
    assert cmd[i + 1 : i + 3] == ["--config", "/srv/nsjail.cfg"]
    flags = _flags(cmd)
    assert [f for f, _ in flags].count("--config") == 1


@pytest.mark.parametrize(
    ("timeout_s", "expected"), [(0.1, 3), (1, 3), (2.5, 5), (10, 12), (900, 902)]
)
def test_time_limit_is_derived_from_the_one_timeout(timeout_s: float, expected: int) -> None:
    spec = JailSpec(code_dir=Path("/c"), entrypoint="h:h", limits=Limits(timeout_s=timeout_s))
    assert nsjail_time_limit(spec) == expected
    flags = dict(_flags(build_command(CONFIG, spec, ctl_fd=3, log_fd=4)))
    # Always set, never nsjail's 600 s default, and never 0 (which means no limit).
    assert flags["--time_limit"] == str(expected)
    assert int(flags["--time_limit"]) > timeout_s


def test_warm_worker_lifetime_and_cpu() -> None:
    spec = JailSpec(code_dir=Path("/c"), entrypoint="h:h", limits=LIMITS, mode="warm")
    cmd = build_command(CONFIG, spec, ctl_fd=3, log_fd=4)
    flags = dict(_flags(cmd))
    assert flags["--time_limit"] == str(24 * 3600)
    assert flags["--rlimit_cpu"] == "inf"  # each child lowers its own RLIMIT_CPU
    assert cmd[-4:] == ["3", "h:h", "warm", str(LIMITS.request_bytes)]


def test_every_bind_is_read_only_and_nothing_else_is_mounted_writable() -> None:
    flags = _flags(build_command(CONFIG, SPEC, ctl_fd=7, log_fd=9))
    names = {f for f, _ in flags}
    assert "--bindmount" not in names
    assert "--bindmount_rw" not in names
    assert "--tmpfsmount" not in names
    binds = [v for f, v in flags if f == "--bindmount_ro"]
    assert len(binds) == len(INTERP.binds) + 3
    for value in (v for f, v in flags if f == "--mount"):
        assert ":tmpfs:" in value and "size=" in value and "nr_inodes=" in value


def test_cgroups_are_the_gateways_slots_not_nsjails() -> None:
    """nsjail gets no cgroup flag: the launcher puts nsjail itself in the slot."""
    cmd = build_command(CONFIG, SPEC, ctl_fd=7, log_fd=9)
    assert not any(a.startswith("--cgroup") or a == "--use_cgroupv2" for a in cmd)
    assert cmd[:4] == ["/bin/sh", "-c", LAUNCHER, "nsfaas-launch"]
    assert cmd[4:7] == [str(p) for p in V1_PROCS]
    v2 = Cgroups(version=2, parent="nsfaas", root=Path("/sys/fs/cgroup/nsfaas"))
    cfg2 = JailConfig(nsjail=Path("/n"), base_cfg=Path("/c"), interpreter=INTERP,
                      runtime_dir=Path("/r"), cgroups=v2, slots=SlotPool(v2),
                      shell=Path("/bin/sh"))
    procs2 = SlotPool(v2).procs_files(SLOT)
    assert procs2 == [Path(f"/sys/fs/cgroup/nsfaas/{SLOT}/cgroup.procs")]
    cmd2 = build_command(cfg2, SPEC, ctl_fd=7, log_fd=9, cgroup_procs=procs2)
    assert cmd2[4:7] == [str(procs2[0])] * 3  # v2: one file, written three times
    assert cmd2[7] == "/n"
    assert SlotPool(V1).procs_files(SLOT) == V1_PROCS


def test_slot_limits_come_from_the_function_limits() -> None:
    # the slot also holds nsjail and the zygote: their memory and two pids on top
    assert slot_limits(SPEC) == SlotLimits(memory_bytes=(96 + 16) * 1024 * 1024, pids=12,
                                           cpu_ms_per_sec=500)


def test_pass_fd_is_the_control_fd_and_the_argv_is_fixed() -> None:
    cmd = build_command(CONFIG, SPEC, ctl_fd=11, log_fd=12)
    assert ("--pass_fd", "11") in _flags(cmd)
    assert ("--log_fd", "12") in _flags(cmd)
    tail = cmd[cmd.index("--") + 1 :]
    assert tail == ["/usr/bin/python3", "-I", "-S", "-B", "-c", BOOT,
                    "11", "handler:handler", "once", "1000"]


def test_no_proxy_dir_means_no_run_mount() -> None:
    spec = JailSpec(code_dir=Path("/c"), entrypoint="h:h", limits=LIMITS)
    cmd = build_command(CONFIG, spec, ctl_fd=3, log_fd=4)
    assert not any(a.endswith(":/run/nsfaas") for a in cmd)


# ---- the real nsjail with the real nsjail.cfg ---------------------------------


def _nsjail_log(runner: JailRunner, cfg: Path, deploy: Deploy, program: list[str],
                uid: int | None = None) -> tuple[int, str, str]:
    """Run ``program`` in a jail built exactly as jail/ builds it, with ``cfg``
    (and its own ids, or, without `uid`, the cfg's own map)."""
    spec = JailSpec(code_dir=deploy(GOOD), entrypoint="handler:handler",
                    limits=Limits(timeout_s=5))
    config = replace(runner.config, base_cfg=cfg, per_jail_uid=uid is not None)
    log_r, log_w = os.pipe()
    ctl = os.open("/dev/null", os.O_RDWR)
    try:
        cmd = _build_command(config, spec, ctl_fd=ctl, log_fd=log_w,
                             cgroup_procs=V1_PROCS, uid=uid)
        # nsjail alone (no launcher, so no cgroup): only the cfg is under test here.
        cmd = cmd[cmd.index(str(config.nsjail)) : cmd.index("--") + 1] + program
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                              pass_fds=(ctl, log_w), check=False)
        os.close(log_w)
        log_w = -1
        with os.fdopen(log_r, "r", errors="replace") as f:
            log_r = -1
            log = f.read()
    finally:
        for fd in (ctl, log_w, log_r):
            if fd >= 0:
                os.close(fd)
    return proc.returncode, proc.stdout + proc.stderr, log


def test_nsjail_cfg_parses_and_runs_a_process(runner: JailRunner, deploy: Deploy) -> None:
    code, out, log = _nsjail_log(runner, CFG, deploy, [
        "/usr/bin/python3", "-I", "-S", "-c",
        "import os, socket; print('jailed', os.getuid(), os.getgid(), socket.gethostname())",
    ])
    assert (code, out.strip()) == (0, "jailed 65534 65534 nsfaas"), log
    assert "[E]" not in log and "[F]" not in log, log


def test_a_jail_of_its_own_uid(runner: JailRunner, deploy: Deploy, tmp_path: Path) -> None:
    """The policy minus its id maps, plus one jail's uid on the command line:
    nsjail accepts it and the jail is 65534 inside (outside: see
    tests/hostile/test_kernel_quotas.py). Without a uid such a policy is refused."""
    cfg = tmp_path / "per-uid.cfg"
    cfg.write_text(without_id_maps(CFG.read_text()))
    kept = cfg.read_text().splitlines()
    assert [ln for ln in CFG.read_text().splitlines() if ln not in kept] == [
        'uidmap { inside_id: "65534" outside_id: "65534" count: 1 }',
        'gidmap { inside_id: "65534" outside_id: "65534" count: 1 }',
    ]
    code, out, log = _nsjail_log(runner, cfg, deploy, [
        "/usr/bin/python3", "-I", "-S", "-c", "import os; print(os.getuid(), os.getgid())",
    ], uid=JAIL_UID_BASE + 4242)
    assert (code, out.strip()) == (0, "65534 65534"), log
    with pytest.raises(ValueError, match="its own uid"):
        _build_command(replace(runner.config, per_jail_uid=True), SPEC, ctl_fd=3, log_fd=4,
                       cgroup_procs=V1_PROCS)
    cmd = _build_command(CONFIG, SPEC, ctl_fd=3, log_fd=4, cgroup_procs=V1_PROCS, uid=77)
    i = cmd.index("--user")
    assert cmd[i : i + 4] == ["--user", "65534:77:1", "--group", "65534:77:1"]
    assert cmd.index("--config") < i < cmd.index("--")


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (("mode: ONCE", "mode: BOGUS"), "Couldn't parse configuration"),
        (('"    personality,"', '"    personalityX,"'), "Could not compile policy"),
    ],
)
def test_a_broken_cfg_is_detected(runner: JailRunner, deploy: Deploy, tmp_path: Path,
                                  broken: tuple[str, str], message: str) -> None:
    """The control for the test above: nsjail does refuse a bad cfg or seccomp policy."""
    text = CFG.read_text()
    assert broken[0] in text
    bad = tmp_path / "bad.cfg"
    bad.write_text(text.replace(broken[0], broken[1]))
    code, out, log = _nsjail_log(runner, bad, deploy, ["/usr/bin/python3", "-c", "print(1)"])
    assert code == 255
    assert message in log + out


def test_the_cfg_keeps_its_hardening() -> None:
    """A few lines of the policy the hostile tests rely on, read literally."""
    text = CFG.read_text()
    for line in (
        "mode: ONCE", "clone_newnet: true", "clone_newuser: true", "clone_newpid: true",
        "clone_newipc: true", "clone_newcgroup: true", "keep_env: false", "keep_caps: false",
        "disable_no_new_privs: false", "mount_proc: false", "USE nsfaas DEFAULT ALLOW",
        'ERRNO(38) { clone3 }', "socket { family != AF_UNIX }",
    ):
        assert line in text, line
    assert "is_bind: true" in text
    binds = [ln for ln in text.splitlines() if "is_bind: true" in ln]
    assert all(any(d in ln for d in ("/dev/null", "/dev/zero", "/dev/urandom")) for ln in binds)


def test_tmp_size_and_inodes_come_from_the_limits() -> None:
    spec = JailSpec(code_dir=Path("/c"), entrypoint="h:h",
                    limits=Limits(tmp_mb=6, tmp_inodes=100))
    flags = _flags(build_command(CONFIG, spec, ctl_fd=3, log_fd=4))
    tmp = [v for f, v in flags if f == "--mount" and v.startswith("none:/tmp:")]
    assert tmp == ["none:/tmp:tmpfs:size=6291456,nr_inodes=100,mode=1777"]


async def test_bytecode_is_capped_against_its_source(jail: Jail, deploy: Deploy) -> None:
    """Constant folding turns `"ab" * 2048` (11 bytes of source) into 4 KB of
    bytecode: 2.4 MB of such source wrote 863 MB of __pycache__, past the
    tenant's code quota. Bytecode past twice the source is not written; the
    jail compiles that code in its own memory instead, and it still runs."""
    folded = "".join(f'X{i} = "{i:05d}" * 800\n' for i in range(2000))  # 4 KB each
    src = folded + "def handler(r, c):\n    return {'n': len(X1999)}\n"
    code = deploy(src)
    assert not list(code.rglob("*.pyc")), "the bytecode budget was not applied"
    plain = deploy("def handler(r, c):\n    return {'n': 1}\n")
    assert list(plain.rglob("*.pyc")), "ordinary code is still precompiled"
    r = await jail.cold(src)
    assert body_json(r) == {"n": 4000}, describe(r)
