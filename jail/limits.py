"""Per-invocation limits: one value object, units in every name."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """What one invocation may use. Every limit has a hostile test in tests/hostile."""

    timeout_s: float = 10.0  # wall clock, the one authoritative timeout
    memory_mb: int = 128  # memory cgroup limit (swap is always 0)
    cpu_s: int = 0  # RLIMIT_CPU per process; 0 means ceil(timeout_s)
    cpu_ms_per_sec: int = 1000  # CPU cgroup share: 1000 = one core at most
    pids: int = 32  # pids cgroup: processes and threads, the runtime included
    file_size_mb: int = 8  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE
    tmp_mb: int = 16  # size of the private /tmp tmpfs
    tmp_inodes: int = 512  # files and directories in /tmp
    log_bytes: int = 1 << 20  # stdout + stderr + log lines per invocation
    log_lines: int = 5000
    response_bytes: int = 6 << 20
    request_bytes: int = 6 << 20
    # Run in the penalty box: one cgroup shared by every throttled jail, whose
    # quota caps them all together (jail.cgroups.BOX).
    penalty_box: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s <= 900:
            raise ValueError(f"timeout_s must be in (0, 900], got {self.timeout_s}")
        if not 16 <= self.memory_mb <= 16384:
            raise ValueError(f"memory_mb must be in [16, 16384], got {self.memory_mb}")
        for name in ("pids", "file_size_mb", "open_files", "tmp_mb", "tmp_inodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")

    @property
    def effective_cpu_s(self) -> int:
        return self.cpu_s or max(1, math.ceil(self.timeout_s))

    def for_runtime(self) -> dict[str, int]:
        """The part of the limits the zygote enforces on its children."""
        return {
            "cpu_s": self.effective_cpu_s,
            "log_bytes": self.log_bytes,
            "log_lines": self.log_lines,
            "response_bytes": self.response_bytes,
        }
