"""What one invocation produced, and the one place a jail's end becomes an outcome."""

from __future__ import annotations

import math
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from .limits import Limits
from .runtime import _frames

Outcome = Literal[
    "ok",  # handler returned a valid response
    "error",  # handler raised, or the process ended without a result
    "timeout",  # wall-clock or CPU-time limit
    "oom",  # killed by the memory cgroup
    "killed",  # killed by a signal, or the pids limit broke it
    "output_limit",  # logs or response over their cap
    "bad_response",  # a return value or HTTP response outside the contract
    "rejected",  # concurrency or queue full (decided before any jail)
    "jail_failure",  # nsjail itself failed: not the customer's fault
]
OUTCOMES: tuple[str, ...] = Outcome.__args__  # type: ignore[attr-defined]

LEVELS = ("debug", "info", "warning", "error", "critical")
# Framing and hop-by-hop headers, and those the gateway sets itself on every
# answer (a function's own Date, Server or X-Request-Id would make two).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "content-length",
        "date",
        "server",
        "x-request-id",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-invocation-id",
    }
)
# Used with fullmatch: a "$" would also match before a final newline, and
# uvicorn drops the connection on a name like "X-A\n" (an empty reply, with
# the record saying ok).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters (tab allowed) and anything beyond latin-1, which HTTP/1.1
# cannot carry in a field value.
# Controls (C0, DEL and C1: 0x85 NEL and 0x9b CSI act on terminals too), and
# anything latin-1 cannot carry.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]|[^\x00-\xff]")
# What a JSON body must hold to be other than strict JSON: a UTF-16 surrogate's
# escape (maybe a lone one), or NaN/Infinity. Only then is the body parsed.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]|NaN|Infinity")
MAX_HEADERS = 64
# Headers a response may carry once (RFC 9110: not list-valued).
SINGLETONS = frozenset({"content-type", "location", "content-encoding", "etag", "last-modified"})
MAX_HEADER_BYTES = 16 * 1024
# A result frame's JSON header: status, at most MAX_HEADER_BYTES of response
# headers (up to 6x that once escaped), an error message of 2,000 characters
# and usage. The gateway decodes it on its event loop: 1 MiB of it (the frame
# protocol's own cap) cost about a second of CPU there, shared by every tenant.
RESULT_MAX_HEADER = 128 * 1024
# What JSON from inside a jail may hold that neither the store (UTF-8 text)
# nor a JSON response (no NaN) can: lone surrogates ("\\ud800" is valid JSON,
# not UTF-8) and NaN/Infinity. Only a document that mentions one is walked.
_SUSPECT = re.compile(r"\\u[dD][89a-fA-F]|NaN|Infinity")
_SUSPECT_BYTES = re.compile(_SUSPECT.pattern.encode())


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line a function logged: stdout, stderr, logging or ctx.log."""

    ts: float
    stream: str  # stdout | stderr | ctx | runtime
    level: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JailResult:
    outcome: Outcome
    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    logs: tuple[LogEntry, ...] = ()
    logs_truncated: bool = False
    logs_dropped: int = 0  # lines the tenant's log budget refused (Invocation.log_gate)
    wall_ms: float = 0.0
    cpu_ms: float | None = None
    peak_memory_mb: float | None = None
    start: Literal["cold", "warm"] = "cold"
    error_type: str | None = None
    error_message: str | None = None
    limit_name: str | None = None
    limit_value: float | None = None


def jail_json(raw: bytes | str) -> Any:
    """JSON from inside a jail, safe to store and to serve: lone surrogates
    become U+FFFD and non-finite numbers null. ValueError as ``_frames.loads``."""
    value = _frames.loads(raw)
    suspect = _SUSPECT_BYTES if isinstance(raw, bytes) else _SUSPECT
    if not suspect.search(raw):  # type: ignore[arg-type]
        return value
    try:
        return _scrub(value)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def jail_header(raw: bytes) -> dict[str, Any]:
    """``_frames.decode_header`` for a frame that comes out of a jail."""
    try:
        header = jail_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _frames.FrameError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _frames.FrameError("frame header is not a JSON object")
    return header


def not_strict_json(value: Any) -> str | None:
    """Why a parsed JSON value is not strict JSON (RFC 8259), or None.

    Python's parser accepts two things that break whatever the value reaches
    next: a lone surrogate written as an escape ("\\ud800"), which no UTF-8
    codec or SQLite text column takes, and NaN or Infinity, which JSON
    renderers refuse. Iterative: a value nests as deep as the parser allows.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            # isascii() is O(1) in CPython: a large base64 archive skips the scan.
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return "a lone UTF-16 surrogate (\\ud800-\\udfff), which UTF-8 cannot encode"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "NaN or Infinity, which JSON does not allow"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def clean_text(text: str) -> str:
    """``text`` without lone surrogates (each becomes U+FFFD)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(k): _scrub(v) for k, v in value.items()}
    return value


def usage_number(value: Any) -> float | None:
    """A cpu_ms/maxrss_kb figure a jail reported: a finite number >= 0, or None.
    (The runtime in the jail reports them; a function can forge them.)"""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def log_entry(stream: str, line: str, ts: float | None = None) -> LogEntry:
    """Structured lines from ctx.log / logging keep level and fields;
    a stdout/stderr line that is itself a JSON object becomes fields."""
    now = time.time() if ts is None else ts
    level = "error" if stream == "stderr" else "info"
    if line.startswith("{"):
        try:
            obj = jail_json(line)  # ValueError for too-deep nesting too
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            if stream == "ctx":
                lvl = str(obj.get("level", "info")).lower()
                fields = obj.get("fields")
                stamp = usage_number(obj.get("ts"))
                return LogEntry(
                    # The child's clock, unless it is not a time of this invocation.
                    ts=stamp if stamp is not None and abs(stamp - now) < 3600 else now,
                    stream=stream,
                    level=lvl if lvl in LEVELS else "info",
                    message=str(obj.get("message", ""))[:16384],
                    fields=fields if isinstance(fields, dict) else {},
                )
            lvl = str(obj.get("level", level)).lower()
            msg = obj.get("message", obj.get("msg", ""))
            rest = {k: v for k, v in obj.items() if k not in ("level", "message", "msg")}
            return LogEntry(now, stream, lvl if lvl in LEVELS else level, str(msg), rest)
    return LogEntry(now, stream, level, line)


def check_response(status: Any, headers: Any) -> tuple[int, tuple[tuple[str, str], ...]] | str:
    """Validate what a function asked the gateway to send. Returns the clean
    (status, headers) or a reason string for a ``bad_response``."""
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        return f"status {status!r} is outside 200-599"
    # The function's own 64, and the content-type the runtime may add.
    if not isinstance(headers, list) or len(headers) > MAX_HEADERS + 1:
        return f"at most {MAX_HEADERS} headers"
    clean: list[tuple[str, str]] = []
    total = 0
    for item in headers:
        if not (
            isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
        ):
            return "headers must be string pairs"
        name, value = item
        if not _TOKEN.fullmatch(name):
            return f"invalid header name {name[:64]!r}"
        if _BAD_VALUE.search(value):
            return (
                f"header {name[:64]!r} contains CR, LF, NUL, another control character "
                "or a character outside latin-1"
            )
        total += len(name) + len(value)
        if total > MAX_HEADER_BYTES:
            return f"headers exceed {MAX_HEADER_BYTES} bytes"
        lower = name.lower()
        if lower in HOP_BY_HOP:
            continue  # framing and hop-by-hop headers belong to the gateway
        if lower in SINGLETONS and any(n.lower() == lower for n, _ in clean):
            # Two Content-Types reached the client as they were: which one a
            # client uses is its guess.
            return f"header {name!r} given twice: it takes one value"
        # Outer spaces and tabs are not part of a field value (RFC 9110 §5.5).
        clean.append((name, value.strip(" \t")))
    return status, tuple(clean)


@dataclass(slots=True)
class Ending:
    """Everything known about how an invocation ended, before deciding the outcome."""

    limits: Limits
    timed_out: bool = False
    done: dict[str, Any] | None = None  # how the child ended (see Worker._finish)
    result_body: bytes = b""
    load_error: dict[str, Any] | None = None
    oom_kills: int = 0
    pids_hits: int = 0
    nsjail_exit: int | None = None
    nsjail_log: str = ""
    loading: bool = False  # the runtime died before it had loaded the function
    reported_usage: dict[str, Any] | None = None  # the result frame's "usage", once decoded


def decide(end: Ending) -> dict[str, Any]:
    """The one function that turns an Ending into outcome fields of a JailResult."""
    lim = end.limits
    if end.timed_out:
        return _limit("timeout", "wall_time", lim.timeout_s, f"exceeded {lim.timeout_s} s")
    if end.load_error is not None:
        return {
            "outcome": "error",
            "error_type": str(end.load_error.get("error_type", "ImportError")),
            "error_message": "loading the function failed: "
            + str(end.load_error.get("message", ""))[:2000],
        }
    done = end.done
    if done is None:
        if end.oom_kills:
            return _limit("oom", "memory", lim.memory_mb, f"exceeded {lim.memory_mb} MB")
        if end.nsjail_exit == 255 and ("[E]" in end.nsjail_log or "[F]" in end.nsjail_log):
            return {
                "outcome": "jail_failure",
                "error_type": "JailFailure",
                "error_message": "nsjail failed to run the jail",
            }
        if end.nsjail_exit == 128 + signal.SIGKILL:
            # The jail's pid 1 (nsjail exits 128+9 when it was SIGKILLed) ignores
            # every signal sent from inside the jail and we did not time it out:
            # the OOM killer would have counted itself above (the slot's counter
            # is read through a file kept open), so this was a kill from outside
            # (an operator, a host tool). Not a limit: no penalty strike.
            return {
                "outcome": "killed",
                "error_type": "Killed",
                "error_message": "the jail was killed from outside",
            }
        if end.loading:
            # Its import ended the runtime (os._exit, closing its channels, a
            # signal): the function's failure, like an exception at import.
            code = end.nsjail_exit
            how = f"exit code {code}" if code is None or code < 128 else f"signal {code - 128}"
            return {
                "outcome": "error",
                "error_type": "LoadFailed",
                "error_message": f"the runtime ended while loading the function ({how})",
            }
        return {
            "outcome": "killed",
            "error_type": "Killed",
            "error_message": "the function's runtime was killed",
        }
    if done.get("limit") == "output":
        return _limit("output_limit", "output", lim.log_bytes, "log output over its cap")
    if done.get("limit") == "output_lines":
        return _limit("output_limit", "output", lim.log_lines,
                      f"more than {lim.log_lines} log lines")
    if done.get("limit") == "response":
        return _limit("output_limit", "response", lim.response_bytes, "response over its cap")
    code = done.get("exit_code")
    # "early": a whole result frame arrived before the child's exit was reported;
    # it is reaped after the answer (its exit status no longer matters).
    if (code == 0 or done.get("early") is True) and end.result_body:
        return _from_frame(end.result_body, end)
    if isinstance(code, int) and code < 0:
        sig = -code
        cpu_ms = usage_number(done.get("cpu_ms")) or 0.0
        if end.oom_kills:
            return _limit("oom", "memory", lim.memory_mb, f"exceeded {lim.memory_mb} MB")
        # SIGXCPU comes from RLIMIT_CPU's soft limit, whose tick-based count runs
        # ahead of the rusage total on a busy machine (seen: 880 ms at a 1 s
        # limit), so half the limit is the bar; SIGKILL (the hard limit, one
        # second later) keeps the strict one, as it has many other senders.
        cpu_bar = {int(signal.SIGXCPU): 500, int(signal.SIGKILL): 900}.get(sig)
        if cpu_bar is not None and cpu_ms >= lim.effective_cpu_s * cpu_bar:
            return _limit("timeout", "cpu_time", lim.effective_cpu_s, "CPU time limit")
        if end.pids_hits:
            return _limit("killed", "pids", lim.pids, f"hit the {lim.pids} process limit")
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return {"outcome": "killed", "error_type": "Killed", "error_message": f"killed by {name}"}
    if end.oom_kills:
        return _limit("oom", "memory", lim.memory_mb, f"exceeded {lim.memory_mb} MB")
    return {
        "outcome": "error",
        "error_type": "NoResult",
        "error_message": f"the function exited (code {code}) without returning a result",
    }


def _from_frame(raw: bytes, end: Ending) -> dict[str, Any]:
    try:
        if len(raw) < _frames.PREFIX.size:
            raise _frames.FrameError("truncated result frame")
        hlen, blen = _frames.PREFIX.unpack_from(raw)
        if len(raw) != _frames.PREFIX.size + hlen + blen:
            raise _frames.FrameError("truncated result frame")
        if hlen > RESULT_MAX_HEADER:
            raise _frames.FrameError(f"result frame header over {RESULT_MAX_HEADER} bytes")
        head = jail_header(raw[_frames.PREFIX.size : _frames.PREFIX.size + hlen])
    except (_frames.FrameError, ValueError) as exc:
        return {"outcome": "error", "error_type": "NoResult", "error_message": str(exc)}
    usage = head.get("usage")
    end.reported_usage = usage if isinstance(usage, dict) else None  # decoded once
    body = raw[_frames.PREFIX.size + hlen :]
    kind = head.get("kind")
    if kind == "error":
        if end.pids_hits:
            return _limit("killed", "pids", end.limits.pids, "hit the process limit")
        return {
            "outcome": "error",
            "error_type": str(head.get("error_type", "Exception"))[:200],
            "error_message": str(head.get("message", ""))[:2000],
        }
    if kind == "bad_response":
        return {
            "outcome": "bad_response",
            "error_type": "BadResponse",
            "error_message": str(head.get("message", ""))[:2000],
        }
    if kind != "ok":
        return {
            "outcome": "bad_response",
            "error_type": "BadResponse",
            "error_message": "bad frame",
        }
    checked = check_response(head.get("status"), head.get("headers"))
    if isinstance(checked, str):
        return {"outcome": "bad_response", "error_type": "BadResponse", "error_message": checked}
    status, headers = checked
    if _SURROGATE_ESCAPE.search(body) and _declares_json(headers):
        # {"s": "\udfff"} is JSON to Python's parser, but no UTF-8 text, and
        # strict clients refuse it (a str body holding one is refused already).
        try:
            why = not_strict_json(_frames._loads(body))
        except RecursionError:  # JavaScript's JSON.parse reads deeper than Python's
            why = "nesting too deep to check"
        except ValueError:
            why = None  # not JSON at all: the function's own business
        if why is not None:
            return {
                "outcome": "bad_response",
                "error_type": "BadResponse",
                "error_message": f"the JSON body holds {why}",
            }
    return {"outcome": "ok", "status": status, "headers": headers, "body": body}


def _declares_json(headers: tuple[tuple[str, str], ...]) -> bool:
    """Any Content-Type naming JSON (clients differ on which of two they use;
    text/json, application/x-json and +json types are JSON to them too)."""
    return any(
        name.lower() == "content-type" and "json" in value.split(";")[0].lower()
        for name, value in headers
    )


def _limit(outcome: str, name: str, value: float, message: str) -> dict[str, Any]:
    return {
        "outcome": outcome,
        "error_type": outcome,
        "error_message": message,
        "limit_name": name,
        "limit_value": float(value),
    }
