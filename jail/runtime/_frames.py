"""Framing shared by the gateway and the runtime inside the jail (stdlib only).

A frame is ``>II`` (header length, body length), a JSON header (an object)
and an opaque body. Both lengths are checked against caps before anything is
read, so a peer can never make the other side allocate more than it allows.
"""

from __future__ import annotations

import _json
import json
import os
import struct
from typing import Any

PREFIX = struct.Struct(">II")
MAX_HEADER = 1 << 20  # 1 MiB of JSON is far more than any control message needs


# json.dumps and json.loads build an encoder and look up a dozen options on
# every call; in a freshly forked child each object they touch is one more
# copy-on-write page fault (~3 us here). One C encoder and one C scanner, made
# at import in the zygote, do the same work and touch far less. Both give
# exactly what json.dumps(obj) and json.loads(text) give.
def _encoder(markers: dict[int, Any], allow_nan: bool) -> Any:
    return _json.make_encoder(
        markers,
        json.JSONEncoder().default,
        _json.encode_basestring_ascii,
        None,
        ": ",
        ", ",
        False,
        False,
        allow_nan,
    )


_MARKERS: dict[int, Any] = {}
_ENCODER = _encoder(_MARKERS, True)
# A handler's JSON body: the same, but NaN and Infinity are a ValueError
# (json.dumps writes them, and no other JSON parser reads them back).
_BODY_MARKERS: dict[int, Any] = {}
_BODY_ENCODER = _encoder(_BODY_MARKERS, False)
_SCAN = _json.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


class FrameError(Exception):
    """The peer sent something that is not a well-formed frame."""


def dumps(value: Any) -> str:
    """``json.dumps(value)`` for a dict or a list, byte for byte; nesting deeper
    than the recursion limit is a ValueError (json.dumps: RecursionError)."""
    return _run(_ENCODER, _MARKERS, value)


def dumps_strict(value: Any) -> str:
    """``dumps``, except that NaN and Infinity are a ValueError (strict JSON)."""
    return _run(_BODY_ENCODER, _BODY_MARKERS, value)


def _run(encoder: Any, markers: dict[int, Any], value: Any) -> str:
    try:
        return "".join(encoder(value, 0))
    except BaseException as exc:
        markers.clear()  # what a failed run left there would mean "circular" next time
        if isinstance(exc, RecursionError):
            raise ValueError("JSON nested too deeply") from None
        raise


def loads(raw: bytes | str) -> Any:
    """``json.loads(raw)``, except that JSON nested deeper than the recursion
    limit is a ValueError too (json.loads raises RecursionError: a few KB of
    brackets from a peer must be bad input, not a crash)."""
    try:
        return _loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _loads(raw: bytes | str) -> Any:
    # The fast path takes only a document that is exactly one JSON value (what
    # dumps writes); anything else, errors included, goes to json.loads.
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        value, end = _SCAN(text, 0)
        if end == len(text):
            return value
    except (ValueError, StopIteration):
        pass
    return json.loads(raw)


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    raw = dumps(header).encode()
    return PREFIX.pack(len(raw), len(body)) + raw + body


def decode_header(raw: bytes) -> dict[str, Any]:
    try:
        header = loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header is not a JSON object")
    return header


def check_lengths(hlen: int, blen: int, max_body: int) -> None:
    if hlen > MAX_HEADER:
        raise FrameError(f"frame header of {hlen} bytes exceeds {MAX_HEADER}")
    if blen > max_body:
        raise FrameError(f"frame body of {blen} bytes exceeds {max_body}")


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, max_body: int) -> tuple[dict[str, Any], bytes]:
    """Blocking read of one frame from a file descriptor (runtime side)."""
    hlen, blen = PREFIX.unpack(_read_exact(fd, PREFIX.size))
    check_lengths(hlen, blen, max_body)
    header = decode_header(_read_exact(fd, hlen))
    return header, _read_exact(fd, blen) if blen else b""


def write_all(fd: int, data: bytes) -> None:
    """Write everything, also to an fd the function made non-blocking (the
    channels' file status is shared with it): on EAGAIN wait for the reader."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            wait_writable(fd)
            continue
        view = view[n:]


def wait_writable(fd: int) -> None:
    """Block until ``fd`` takes a write (or is broken: the write then says so)."""
    import select  # only after an EAGAIN: nothing to import on the usual path

    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll()
