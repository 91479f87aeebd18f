"""The store: tenants, functions and their versions, KV data, invocation records, log lines.

The gateway talks to storage only through `Store`, so the embedded SQLite backend
(`gateway._sqlite`) can be swapped for a shared one without touching callers.

Exceptions::

    StoreError              any store failure; `.code` is a stable snake_case identifier
    ├── NotFound            "tenant_not_found", "function_not_found", "version_not_found", ...
    ├── Conflict            "route_conflict", "tenant_exists", "not_an_integer", ...
    └── QuotaExceeded       "kv_quota_exceeded"

Bad arguments (a malformed route, cursor or level) raise `ValueError`.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

_T = TypeVar("_T")

__all__ = [
    "LOG_LEVELS",
    "ROUTE_METHODS",
    "Conflict",
    "FunctionConfig",
    "FunctionInfo",
    "FunctionVersion",
    "InvocationRecord",
    "LogLine",
    "NewLogLine",
    "NotFound",
    "QuotaExceeded",
    "RouteEntry",
    "Store",
    "StoreError",
    "Tenant",
    "methods_overlap",
    "open_store",
    "parse_route",
    "route_pattern",
]


class StoreError(Exception):
    """Root of the store's exceptions."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NotFound(StoreError):
    """The tenant, function, version, invocation or blob does not exist."""


class Conflict(StoreError):
    """The change contradicts what is stored (a taken route, a duplicate name, ...)."""


class QuotaExceeded(StoreError):
    """A KV write would take the tenant over its byte or key quota; nothing was written."""


def safe_text(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate (valid in a Python str,
    and in JSON as "\\ud800") becomes U+FFFD instead of failing a write."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def fields_json(fields: dict[str, Any]) -> str:
    """A log line's fields as stored: JSON that any reader (and a JSON response)
    accepts, whatever a caller put in them."""
    try:
        text = json.dumps(fields, ensure_ascii=False, default=str, allow_nan=False)
    except (ValueError, RecursionError):  # NaN/Infinity, or nesting past the limit
        return '{"fields_dropped": "not storable as JSON (NaN, Infinity or too deep)"}'
    return safe_text(text)


# -- routes -------------------------------------------------------------------------------

ROUTE_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "ANY"})
# Paths the gateway serves itself; "/api" and "/fn" also cover everything below them.
_RESERVED_TREES = ("/api", "/fn")
_RESERVED_STARTS = ("/healthz", "/metrics")
_MAX_ROUTE_PATH = 512
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")
# No '%': routes match the decoded path, so "a%20b" could never match and
# "%75sers" would look unlike "users" to the overlap check.
_STATIC = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]+")


def parse_route(route: str) -> tuple[str, str]:
    """Split a declared route like ``"GET /users/{id}"`` into ``("GET", "/users/{id}")``.

    Raises `ValueError` naming the problem. The method is upper-cased.
    """
    parts = route.split()
    if len(parts) != 2:
        raise ValueError(f"route {route!r} must be 'METHOD /path', e.g. 'GET /users/{{id}}'")
    method, path = parts[0].upper(), parts[1]
    if method not in ROUTE_METHODS:
        allowed = " ".join(sorted(ROUTE_METHODS))
        raise ValueError(f"route {route!r}: method must be one of {allowed}")
    if not path.startswith("/"):
        raise ValueError(f"route {route!r}: path must start with '/'")
    if len(path) > _MAX_ROUTE_PATH:
        raise ValueError(f"route {route!r}: path is longer than {_MAX_ROUTE_PATH} characters")
    if any(path == p or path.startswith(p + "/") for p in _RESERVED_TREES) or path.startswith(
        _RESERVED_STARTS
    ):
        raise ValueError(
            f"route {route!r}: paths under /api/, /fn/, /healthz and /metrics are reserved"
        )
    if path == "/":
        return method, path
    segments = path[1:].split("/")
    if _PARAM.fullmatch(segments[0]):
        # Routes are global (a request path names no tenant) and first come,
        # first served: "/{p:path}" or "/{id}" would overlap every route of
        # every other tenant, so one tenant could lock all others out.
        raise ValueError(
            f"route {route!r}: a route must begin with a literal path segment, "
            "e.g. '/shop/{p:path}', not a parameter, so that it cannot claim "
            "every other tenant's paths"
        )
    names: set[str] = set()
    for i, segment in enumerate(segments):
        match = _PARAM.fullmatch(segment)
        if match:
            if match.group(1) in names:
                raise ValueError(f"route {route!r}: parameter {match.group(1)!r} appears twice")
            names.add(match.group(1))
            if match.group(2) and i != len(segments) - 1:
                raise ValueError(f"route {route!r}: a {{name:path}} parameter must come last")
        elif not segment:
            raise ValueError(f"route {route!r}: empty path segment")
        elif segment in (".", "..") or not _STATIC.fullmatch(segment):
            raise ValueError(f"route {route!r}: invalid path segment {segment!r}")
    return method, path


def route_pattern(path: str) -> str:
    """The path with every ``{param}`` / ``{param:path}`` segment replaced by ``{}``."""
    return "/".join("{}" if _PARAM.fullmatch(s) else s for s in path.split("/"))


def route_shape(path: str) -> str:
    """``route_pattern`` that tells a ``{name:path}`` tail (``{**}``) from a
    ``{param}`` segment: within a tenant only routes of one shape collide
    (``/users/{id}`` and ``/users/{rest:path}`` may be two functions')."""
    return "/".join(
        ("{**}" if s.endswith(":path}") else "{}") if _PARAM.fullmatch(s) else s
        for s in path.split("/")
    )


def methods_overlap(a: str, b: str) -> bool:
    """True if two route methods can match the same request (ANY overlaps
    everything; a GET route also answers HEAD)."""
    return a == b or "ANY" in (a, b) or {a, b} == {"GET", "HEAD"}


def _segments(path: str) -> tuple[list[str | None], bool]:
    """A route path as its segments (None for a ``{param}``) and whether it
    ends in a ``{name:path}`` tail (which is not among the segments)."""
    parts = path[1:].split("/") if path != "/" else []
    tail = bool(parts) and parts[-1].endswith(":path}") and _PARAM.fullmatch(parts[-1]) is not None
    if tail:
        parts = parts[:-1]
    return [None if _PARAM.fullmatch(p) else p for p in parts], tail


def paths_overlap(a: str, b: str) -> bool:
    """True if some request path matches both route paths.

    A ``{param}`` matches one non-empty segment, a ``{name:path}`` tail matches
    the rest of the path (slashes included, possibly empty) after its '/'.
    """
    sa, tail_a = _segments(a)
    sb, tail_b = _segments(b)

    def same(x: str | None, y: str | None) -> bool:
        return x is None or y is None or x == y

    if not tail_a and not tail_b:
        return len(sa) == len(sb) and all(map(same, sa, sb))
    if tail_a and tail_b:
        return all(map(same, sa, sb))  # zip: the shorter fixed part decides
    fixed, tail_fixed = (sb, sa) if tail_a else (sa, sb)
    # The tail route matches its fixed part + '/' + anything: the other path
    # needs more segments (its own are never empty), except the root "/",
    # which a "/{name:path}" route matches with an empty tail.
    if not tail_fixed and not fixed:
        return True
    return len(fixed) > len(tail_fixed) and all(map(same, tail_fixed, fixed))


def route_specificity(path: str) -> tuple[int, ...]:
    """Sort key: at the first segment where two routes differ, a literal beats
    a ``{param}``, which beats a ``{name:path}`` tail."""
    segments, tail = _segments(path)
    return tuple(1 if s is None else 0 for s in segments) + ((2,) if tail else ())


# -- values -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class FunctionConfig:
    """What a deploy declares besides the code; stored with every version."""

    routes: tuple[str, ...]
    timeout_s: float
    memory_mb: int
    env: tuple[tuple[str, str], ...]
    public: bool
    egress_allow: tuple[str, ...]
    entrypoint: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (`env` as an object); `from_json` reads it back."""
        return {
            "routes": list(self.routes),
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
            "env": dict(self.env),
            "public": self.public,
            "egress_allow": list(self.egress_allow),
            "entrypoint": self.entrypoint,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> FunctionConfig:
        """Build from `to_json()` output (or its JSON text); `ValueError` names a bad field."""
        obj: object = json.loads(data) if isinstance(data, str) else data
        if not isinstance(obj, Mapping):
            raise ValueError("function config must be a JSON object")
        env = obj.get("env")
        pairs = list(env.items()) if isinstance(env, Mapping) else env
        if not isinstance(pairs, list) or not all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in pairs
        ):
            raise ValueError("function config: 'env' must map strings to strings")
        timeout = obj.get("timeout_s")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ValueError("function config: 'timeout_s' must be a number")
        return cls(
            routes=_str_tuple(obj, "routes"),
            timeout_s=float(timeout),
            memory_mb=_typed(obj, "memory_mb", int),
            env=tuple((k, v) for k, v in pairs),
            public=_typed(obj, "public", bool),
            egress_allow=_str_tuple(obj, "egress_allow"),
            entrypoint=_typed(obj, "entrypoint", str),
        )


def _typed(obj: Mapping[str, Any], key: str, kind: type[_T]) -> _T:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"function config: {key!r} must be of type {kind.__name__}")
    return value


def _str_tuple(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key)
    if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"function config: {key!r} must be a list of strings")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class FunctionVersion:
    tenant_id: str
    name: str
    version: int
    digest: str
    config: FunctionConfig
    created_at: float
    size: int


@dataclass(frozen=True, slots=True)
class UploadQuota:
    """What an upload may add to, checked in the same write as its version."""

    functions: int  # per tenant
    versions: int  # per function
    code_bytes: int  # per tenant: every version's archive plus unpacked bytes (0: no cap)


@dataclass(frozen=True, slots=True)
class FunctionInfo:
    tenant_id: str
    name: str
    active_version: int
    created_at: float
    updated_at: float
    latest_version: int


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """A declared route as the router needs it."""

    method: str
    path: str
    tenant_id: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class InvocationRecord:
    """One invocation; inserted when it starts, rewritten when it finishes."""

    id: str
    tenant_id: str
    function: str
    version: int
    trigger: str  # "http" | "invoke"
    method: str
    path: str
    started_at: float  # unix seconds
    timeout_s: float
    memory_mb: int
    request_bytes: int
    status: int | None = None
    outcome: str = "running"
    wall_ms: float | None = None
    cpu_ms: float | None = None
    peak_memory_mb: float | None = None
    start: str | None = None  # "cold" | "warm"
    response_bytes: int | None = None
    log_lines: int = 0
    logs_truncated: bool = False
    error_type: str | None = None
    error_message: str | None = None
    limit_name: str | None = None
    limit_value: float | None = None


# Level names in increasing severity, with the numbers stored for `level_min` filtering.
LOG_LEVELS: Mapping[str, int] = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "error": 40,
    "critical": 50,
}


@dataclass(frozen=True, slots=True)
class NewLogLine:
    ts: float
    invocation_id: str | None
    tenant_id: str
    function: str
    level: str  # one of LOG_LEVELS
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LogLine:
    id: int  # increases with every stored line, never reused
    ts: float
    invocation_id: str | None
    tenant_id: str
    function: str
    level: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


# -- the interface ------------------------------------------------------------------------


class Store(abc.ABC):
    """Async storage for the gateway. Use as ``async with open_store(dir) as store:``.

    Every write is one transaction: it happens entirely or not at all.
    """

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema and start the store's threads."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Finish pending work and release every thread and connection."""

    # blobs, content-addressed by sha256
    @abc.abstractmethod
    async def put_blob(self, data: bytes) -> str:
        """Store bytes durably; returns the hex sha256. Idempotent."""

    @abc.abstractmethod
    def blob_path(self, digest: str) -> Path:
        """Where the blob with this digest lives (ValueError for a malformed digest)."""

    @abc.abstractmethod
    async def read_blob(self, digest: str) -> bytes:
        """The blob's bytes, checked against the digest (NotFound if absent)."""

    # tenants
    @abc.abstractmethod
    async def create_tenant(self, name: str) -> tuple[Tenant, str]:
        """A new tenant and its API key; only the key's sha256 is kept."""

    @abc.abstractmethod
    async def tenant_for_key(self, key: str) -> Tenant | None:
        """The tenant owning an API key, or None."""

    @abc.abstractmethod
    async def list_tenants(self) -> list[Tenant]: ...

    @abc.abstractmethod
    async def get_tenant(self, tenant_id: str) -> Tenant: ...

    # functions and versions
    @abc.abstractmethod
    async def put_function(
        self,
        tenant_id: str,
        name: str,
        digest: str,
        size: int,
        config: FunctionConfig,
        *,
        unpacked: int = 0,
        quota: UploadQuota | None = None,
    ) -> tuple[FunctionVersion, bool]:
        """Add a version, make it active and claim its routes; True if the function is new.

        Version numbers only grow, even across rollback and delete. A route that collides
        with another function's raises ``Conflict("route_conflict")`` and writes nothing;
        so does an upload past `quota` (``function_limit``, ``version_limit``,
        ``code_quota``). A failed upload's blob goes too unless a version uses it.
        """

    @abc.abstractmethod
    async def code_usage(self, tenant_id: str) -> int:
        """Bytes the tenant's versions count against ``UploadQuota.code_bytes``."""

    @abc.abstractmethod
    async def get_function(self, tenant_id: str, name: str) -> FunctionInfo: ...

    @abc.abstractmethod
    async def find_function(self, name: str) -> FunctionInfo | None:
        """The function of that name in any tenant (names are global), or None."""

    @abc.abstractmethod
    async def list_functions(self, tenant_id: str | None = None) -> list[FunctionInfo]:
        """Functions of one tenant, or of all tenants for None."""

    @abc.abstractmethod
    async def get_version(
        self, tenant_id: str, name: str, version: int | None = None
    ) -> FunctionVersion:
        """One version; the active one for None."""

    @abc.abstractmethod
    async def list_versions(self, tenant_id: str, name: str) -> list[FunctionVersion]:
        """All versions of a function, oldest first."""

    @abc.abstractmethod
    async def rollback(self, tenant_id: str, name: str, version: int) -> FunctionVersion:
        """Make an existing version active again, with its routes (same conflict rule)."""

    @abc.abstractmethod
    async def delete_function(self, tenant_id: str, name: str) -> list[str]:
        """Remove a function, its versions and routes (the tenant's KV data stays),
        and the code blobs no other version refers to: their digests."""

    @abc.abstractmethod
    async def digest_in_use(self, digest: str, tenant_id: str | None = None) -> bool:
        """Whether any version of any function has this code (of that tenant's)."""

    @abc.abstractmethod
    async def all_routes(self) -> list[RouteEntry]:
        """Every declared route of every active version, for the router."""

    # KV, per tenant
    @abc.abstractmethod
    async def kv_get(self, tenant_id: str, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def kv_put(
        self, tenant_id: str, key: str, value: bytes, *, max_bytes: int, max_keys: int
    ) -> None:
        """Set a key; QuotaExceeded if the tenant's key+value bytes or key count would pass."""

    @abc.abstractmethod
    async def kv_delete(self, tenant_id: str, key: str) -> bool:
        """Remove a key; True if it existed."""

    @abc.abstractmethod
    async def kv_list(
        self, tenant_id: str, prefix: str = "", limit: int = 100, after: str | None = None
    ) -> list[str]:
        """Keys starting with `prefix` (exactly, no wildcards), sorted, after `after`."""

    @abc.abstractmethod
    async def kv_incr(
        self, tenant_id: str, key: str, delta: int = 1, *, max_bytes: int, max_keys: int
    ) -> int:
        """Atomically add to a decimal integer value (missing = 0); returns the new value."""

    @abc.abstractmethod
    async def kv_usage(self, tenant_id: str) -> tuple[int, int]:
        """(bytes, keys) the tenant uses; bytes count keys in UTF-8 plus values."""

    # invocation records
    @abc.abstractmethod
    async def insert_invocation(self, rec: InvocationRecord) -> None: ...

    @abc.abstractmethod
    async def finish_invocation(
        self, rec: InvocationRecord, lines: Sequence[NewLogLine] = (), *, alone: bool = False
    ) -> None:
        """Store every field of `rec` under its id (inserting it if the start was lost),
        with its last log `lines`, all in one atomic write. `alone`: nothing else is
        running, so a store may write at once instead of batching."""

    @abc.abstractmethod
    async def get_invocation(self, invocation_id: str) -> InvocationRecord: ...

    @abc.abstractmethod
    async def list_invocations(
        self,
        *,
        tenant_id: str | None = None,
        function: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[InvocationRecord], str | None]:
        """Newest first; `since` inclusive, `until` exclusive; returns the next page's cursor."""

    # log lines
    @abc.abstractmethod
    async def append_logs(self, lines: Sequence[NewLogLine]) -> None: ...

    @abc.abstractmethod
    async def query_logs(
        self,
        *,
        tenant_id: str | None = None,
        function: str | None = None,
        invocation_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        level_min: str | None = None,
        q: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[LogLine], str | None]:
        """Newest first with a cursor. `q`: every word must occur in the message."""

    @abc.abstractmethod
    async def last_log_id(self) -> int:
        """Id of the newest stored line of any function (0 if none): a live tail starts here."""

    @abc.abstractmethod
    async def logs_after(
        self,
        *,
        tenant_id: str | None,
        function: str,
        after_id: int,
        limit: int = 1000,
        level_min: str | None = None,
        q: str | None = None,
    ) -> list[LogLine]:
        """Lines with id > after_id, oldest first (for live tail)."""

    @abc.abstractmethod
    async def enforce_retention(
        self,
        *,
        max_lines_per_function: int,
        max_age_s: float,
        batch: int = 10_000,
        max_records: int = 0,
    ) -> int:
        """Delete log lines past the per-function count or age, and invocation records
        past the age or, oldest first, past `max_records` in all (0: no cap).

        Deletes at most `batch` rows per call so it never holds the writer long; returns the
        number deleted (call again while it equals `batch`).
        """


def open_store(data_dir: Path) -> Store:
    """The embedded store in `data_dir` (not yet opened)."""
    # Imported here because the backend imports this module.
    from gateway._sqlite import SqliteStore

    return SqliteStore(data_dir)
