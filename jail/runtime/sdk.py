"""The function-facing API (`import nsfaas` inside the jail). Stdlib only.

Inside the jail this file is importable as ``nsfaas``: ``from nsfaas import
Response``. It holds the request and context objects handed to ``handler``,
the ``Response`` type and the conversion of a return value into a frame.
"""

from __future__ import annotations

import _thread
import json
import os
import struct
import time

# Loaded here, in the zygote, once: nearly every handler reads the query, and
# an import in each forked child would cost milliseconds per invocation.
from urllib.parse import parse_qs

# Every import here is paid by every cold start: socket, threading, typing and
# collections.abc are loaded only where they are used.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Iterable, Iterator, Mapping
    from functools import cached_property as _lazy
    from typing import Any

    from jail.runtime import _frames
else:
    try:
        import _frames  # in the jail: this file is the top-level module nsfaas
    except ImportError:
        from jail.runtime import _frames

    class _lazy:
        """An attribute made on first use, then kept in the instance's __dict__
        (a non-data descriptor). What a handler does not use is never built: in
        a forked child every object touched costs a copy-on-write page fault."""

        def __init__(self, make):
            self.make = make
            self.name = make.__name__

        def __get__(self, obj, owner=None):
            if obj is None:
                return self
            value = obj.__dict__[self.name] = self.make(obj)
            return value


__all__ = [
    "Context",
    "EgressDenied",
    "FunctionError",
    "InvokeError",
    "KVQuotaExceeded",
    "ProxyError",
    "Request",
    "Response",
]


class Headers:
    """Case-insensitive, read-only mapping of request headers (first value wins)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = list(items)
        self._map: dict[str, str] = {}
        for k, v in self._items:
            self._map.setdefault(k.lower(), v)

    def __getitem__(self, key: str) -> str:
        return self._map[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._map

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._map.get(key.lower(), default)

    def keys(self) -> list[str]:
        return list(self._map)

    def values(self) -> list[str]:
        return list(self._map.values())

    def items(self) -> list[tuple[str, str]]:
        return list(self._map.items())

    def get_all(self, key: str) -> list[str]:
        return [v for k, v in self._items if k.lower() == key.lower()]

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class Request:
    """What the handler receives: method, path, path_params, query, headers, body."""

    def __init__(self, meta: Mapping[str, Any], body: bytes) -> None:
        self.method: str = meta.get("method", "GET")
        self.path: str = meta.get("path", "/")
        self.query_string: str = meta.get("query_string", "")
        self.body: bytes = body
        self._meta = meta

    @_lazy
    def path_params(self) -> dict[str, str]:
        return dict(self._meta.get("path_params") or {})

    @_lazy
    def headers(self) -> Headers:
        return Headers([(str(k), str(v)) for k, v in self._meta.get("headers") or []])

    @_lazy
    def query_all(self) -> dict[str, list[str]]:
        """Every value of every query parameter."""
        return parse_qs(self.query_string, keep_blank_values=True)

    @property
    def query(self) -> dict[str, str]:
        """The first value of each query parameter."""
        return {k: v[0] for k, v in self.query_all.items()}

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def __repr__(self) -> str:
        return f"Request({self.method} {self.path})"


class Response:
    """An explicit response: ``Response(body, status=200, headers={})``."""

    def __init__(
        self,
        body: Any = b"",
        status: int = 200,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        self.body = body
        self.status = status
        # A mapping, or (name, value) pairs when a name repeats (Set-Cookie).
        self.headers = headers if headers is not None else {}


class FunctionError(Exception):
    """Root of the errors the runtime raises into customer code."""


class ProxyError(FunctionError):
    """The host proxy refused or failed a call; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class KVQuotaExceeded(ProxyError):
    pass


class EgressDenied(ProxyError):
    pass


class InvokeError(ProxyError):
    pass


_ERRORS = {"kv_quota_exceeded": KVQuotaExceeded, "egress_denied": EgressDenied}

# jail/proxy.py's caps (a test checks they agree): the proxy answers a bigger
# frame with frame_too_large and closes the connection, so it is refused here,
# before anything is sent.
_MAX_HEADER = 64 * 1024
_MAX_BODY = 2 * 1024 * 1024
# Error replies after which the proxy closes the connection.
_CLOSING = frozenset({"bad_frame", "frame_too_large", "too_many_connections"})


def _closed() -> ProxyError:
    return ProxyError("proxy_closed", "the host proxy closed the connection")


class _Proxy:
    """Client of the host-proxy socket; one connection, one call at a time.

    A connection the proxy closed is dropped and the next call opens a new
    one; no OSError reaches the caller.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._sock: socket.socket | None = None
        self._lock = _thread.allocate_lock()
        self._next = 0

    def call(self, op: str, body: bytes = b"", **params: Any) -> tuple[dict[str, Any], bytes]:
        with self._lock:
            self._next += 1
            head = json.dumps({"v": 1, "id": self._next, "method": op, "params": params})
            raw = head.encode()
            if len(raw) > _MAX_HEADER or len(body) > _MAX_BODY:
                raise ProxyError(
                    "frame_too_large",
                    f"{len(raw)} header bytes (at most {_MAX_HEADER}) and"
                    f" {len(body)} body bytes (at most {_MAX_BODY})",
                )
            reply, data = self._exchange(struct.pack(">II", len(raw), len(body)) + raw + body)
            if not reply.get("ok") and reply.get("code") in _CLOSING:
                self._drop()
        if not reply.get("ok"):
            code = str(reply.get("code", "proxy_error"))
            cls = _ERRORS.get(code, InvokeError if op == "invoke" else ProxyError)
            raise cls(code, str(reply.get("message", "")))
        return reply, data

    def _exchange(self, frame: bytes) -> tuple[dict[str, Any], bytes]:
        reused = self._sock is not None
        try:
            self._send(frame)
        except OSError:
            if not reused:
                self._stop_sending()
            else:
                # The proxy closed this connection while it sat idle. A send
                # that failed delivered no whole frame, so nothing ran and the
                # frame can go again on a new connection.
                self._drop()
                try:
                    self._send(frame)
                except OSError:
                    self._stop_sending()
        try:
            hlen, blen = struct.unpack(">II", self._recv(8))
            reply = json.loads(self._recv(hlen))
            return reply, self._recv(blen) if blen else b""
        except OSError:
            self._drop()
            raise _closed() from None

    def _send(self, frame: bytes) -> None:
        if self._sock is None:
            if not os.path.exists(self._path):
                raise ProxyError("proxy_unavailable", "no host proxy in this jail")
            import socket

            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError as exc:
                raise ProxyError("proxy_unavailable", f"no socket: {exc}") from None
            try:
                sock.connect(self._path)
            except OSError as exc:
                sock.close()
                raise ProxyError(
                    "proxy_unavailable", f"cannot reach the host proxy: {exc}"
                ) from None
            self._sock = sock
        self._sock.sendall(frame)

    def _stop_sending(self) -> None:
        """After a failed send on a new connection. The proxy may have answered
        before closing it (too_many_connections), so the reply is still read;
        shutting our side first makes that read end even if there is none."""
        assert self._sock is not None
        try:
            self._sock.shutdown(1)  # SHUT_WR; the socket module is imported lazily
        except OSError:
            pass

    def _recv(self, n: int) -> bytes:
        assert self._sock is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                self._drop()
                raise _closed()
            buf += chunk
        return bytes(buf)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class KV:
    """Tenant-scoped key-value data, stored by the gateway."""

    def __init__(self, proxy: _Proxy) -> None:
        self._proxy = proxy

    def get(self, key: str, default: Any = None) -> Any:
        reply, data = self._proxy.call("kv.get", key=key)
        if not reply.get("found"):
            return default
        return json.loads(data) if reply.get("json") else data

    def put(self, key: str, value: Any) -> None:
        if isinstance(value, bytes | bytearray):
            self._proxy.call("kv.put", bytes(value), key=key, json=False)
        else:
            self._proxy.call("kv.put", json.dumps(value).encode(), key=key, json=True)

    def delete(self, key: str) -> bool:
        reply, _ = self._proxy.call("kv.delete", key=key)
        return bool(reply.get("deleted"))

    def list(self, prefix: str = "", limit: int = 100) -> list[str]:
        reply, _ = self._proxy.call("kv.list", prefix=prefix, limit=limit)
        return list(reply.get("keys", []))

    def incr(self, key: str, delta: int = 1) -> int:
        reply, _ = self._proxy.call("kv.incr", key=key, delta=delta)
        return int(reply["value"])


class HTTP:
    """Allow-listed outbound HTTP, performed by the gateway."""

    def __init__(self, proxy: _Proxy) -> None:
        self._proxy = proxy

    def fetch(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | str = b"",
        timeout: float = 10.0,
    ) -> Response:
        data = body.encode() if isinstance(body, str) else bytes(body)
        reply, payload = self._proxy.call(
            "http.fetch", data, method=method, url=url, headers=dict(headers or {}), timeout=timeout
        )
        return Response(payload, status=int(reply["status"]), headers=dict(reply["headers"]))


class Logger:
    """``ctx.log.info("message", key=value)``: one structured log line."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = _thread.allocate_lock()

    def _emit(self, level: str, message: Any, fields: dict[str, Any]) -> None:
        line = {"level": level, "message": str(message), "fields": fields, "ts": time.time()}
        raw = (json.dumps(line, default=repr) + "\n").encode()
        with self._lock:
            try:
                # The function may have made the pipe non-blocking: a line cut
                # at EAGAIN would merge with the next one, so wait and go on.
                _frames.write_all(self._fd, raw)
            except OSError:
                pass  # the log pipe is gone: the invocation is being torn down

    def debug(self, message: Any, **fields: Any) -> None:
        self._emit("debug", message, fields)

    def info(self, message: Any, **fields: Any) -> None:
        self._emit("info", message, fields)

    def warning(self, message: Any, **fields: Any) -> None:
        self._emit("warning", message, fields)

    warn = warning

    def error(self, message: Any, **fields: Any) -> None:
        self._emit("error", message, fields)

    def critical(self, message: Any, **fields: Any) -> None:
        self._emit("critical", message, fields)


class Context:
    """Per-invocation context: ids, env, remaining time, log, kv, http, invoke."""

    def __init__(self, meta: Mapping[str, Any], *, log_fd: int, proxy_path: str) -> None:
        self.invocation_id: str = meta.get("invocation_id", "")
        self.function: str = meta.get("function", "")
        self.version: int = int(meta.get("version", 0))
        self.tenant: str = meta.get("tenant", "")
        self.env: dict[str, str] = dict(meta.get("env") or {})
        self._deadline = time.monotonic() + float(meta.get("timeout_s", 0))
        self._log_fd = log_fd
        self._proxy_path = proxy_path

    @_lazy
    def log(self) -> Logger:
        return Logger(self._log_fd)

    @_lazy
    def kv(self) -> KV:
        return KV(self._proxy)

    @_lazy
    def http(self) -> HTTP:
        return HTTP(self._proxy)

    @_lazy
    def _proxy(self) -> _Proxy:
        return _Proxy(self._proxy_path)

    def remaining_ms(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def invoke(self, name: str, payload: Any = None) -> Any:
        reply, data = self._proxy.call("invoke", json.dumps(payload).encode(), name=name)
        if reply.get("json"):
            # The callee chose the content type, not the body: one labelled
            # JSON may not parse (or nest too deep, or hold an int past the
            # digit limit), and that is its data, not an error of the caller.
            try:
                return json.loads(data)
            except (ValueError, RecursionError):
                pass
        return data


MAX_HEADERS = 64  # a response's own; the runtime may add its content-type


def _header_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"header names must be str, not {type(name).__name__}")
    return name


def _header_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # e.g. {"X-Count": 3}
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return str(value)
    raise TypeError(f"header values must be str or numbers, not {type(value).__name__}")


def to_response(value: Any) -> tuple[int, list[list[str]], bytes]:
    """Turn a handler's return value into (status, headers, body).

    Raises TypeError for anything outside the contract; the caller reports
    that as a ``bad_response`` outcome.
    """
    status: Any = 200
    headers: Any = {}
    if isinstance(value, tuple):
        if len(value) not in (2, 3):
            raise TypeError("a tuple response must be (body, status) or (body, status, headers)")
        value, status, *rest = value
        headers = rest[0] if rest else {}
    elif isinstance(value, Response):
        value, status, headers = value.body, value.status, value.headers
    if isinstance(status, bool) or not isinstance(status, int):
        raise TypeError(f"status must be an int, not {type(status).__name__}")
    # A mapping, or (name, value) pairs: a name may repeat (Set-Cookie).
    pairs = list(headers.items() if hasattr(headers, "items") else headers)
    if len(pairs) > MAX_HEADERS:
        raise ValueError(f"at most {MAX_HEADERS} headers")
    hdrs = [[_header_name(k), _header_value(v)] for k, v in pairs]
    lower = {k.lower() for k, _ in hdrs}

    def ctype(default: str) -> None:
        if "content-type" not in lower:
            hdrs.append(["content-type", default])

    if value is None:
        body = b""
    elif isinstance(value, str):
        body = value.encode()
        ctype("text/plain; charset=utf-8")
    elif isinstance(value, bytes | bytearray | memoryview):
        body = bytes(value)
        ctype("application/octet-stream")
    elif isinstance(value, dict | list):
        body = _frames.dumps_strict(value).encode()
        ctype("application/json")
    else:
        raise TypeError(f"cannot return a {type(value).__name__} from a handler")
    return status, hdrs, body
