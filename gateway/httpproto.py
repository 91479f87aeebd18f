"""The HTTP/1.1 edge: uvicorn's httptools protocol with a cap on request heads.

Neither uvicorn nor httptools bounds a request line or a header: httptools
joins the pieces of a header until it ends, so one 50 MB header was 50 MB in
the gateway, and a head past the runtime's 1 MiB frame-header cap killed the
function's jail and counted against the function (three anonymous requests put
it in the penalty box). Here a head over the cap is answered 431 before the
app sees anything, so no invocation, record or strike exists for it.

Two counts, both against the cap. Bytes fed to the parser since its last
progress (headers complete, a piece of body, a chunk boundary, the message's
end): input goes in in pieces no larger than the room left, so a head that
starts a read is cut off at exactly the cap, before httptools holds more. And
the URL, header names and values of the message, which is what uvicorn keeps
and the jail receives (uvicorn adds a chunked body's trailers to the request's
headers, so they count too): this one also catches a head that starts inside a
read behind another message (pipelining), which the first count sees only from
the next piece on; such a head never holds more than twice the cap.

It also supports no protocol upgrade, and so ignores ``Upgrade`` (RFC 9110
§7.8 lets a server do so). httptools tells llhttp to skip the body of any
request with ``Connection: upgrade`` and ``Upgrade: <anything>`` (``curl
--http2`` sends ``Upgrade: h2c``) and then stops; uvicorn logged "Unsupported
upgrade request", gave the app an empty body and dropped everything after the
head, pipelined requests included: a KV PUT stored 0 bytes and answered 204.
Here such a head is parsed again, without its Upgrade headers, by a fresh
parser, which reads the body and what follows as for any request.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

import httptools
import structlog
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from .config import SettingsError
from .errors import error_document

log = structlog.get_logger("nsfaas.gateway")

# A single total, no per-line cap: 4x Node's 16 KiB and 2x nginx's 4 x 8 KiB,
# so what passes common proxies passes here.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
MIN_MAX_HEADER_BYTES = 1024
# Every byte 0x80-0xFF of a header becomes a 6-byte \u00XX in the JSON frame
# header sent to the jail: 6 x 128 KiB plus the function's env (16 KiB, also
# escaped) stays under the runtime's 1 MiB frame-header cap.
MAX_MAX_HEADER_BYTES = 128 * 1024
# After the 431 the client may still be sending the rest of its head. Closing
# with unread input makes the kernel send a reset, which can destroy the 431
# before the client reads it; so, like nginx's lingering close, read and drop
# for a while first.
LINGER_S = 2.0
# A head must arrive whole within this, counted from the connection's start or
# the previous response's end: uvicorn times out neither a connection that
# never sends a byte nor a head sent a byte at a time, and each one held holds
# a file descriptor (nginx's client_header_timeout is 60 s; a function call's
# head is one small packet).
HEAD_TIMEOUT_S = 10.0
# A 405 must say what is allowed; for CONNECT no resource is named, so this is
# what some path of the gateway may take (a function route can take any of them).
ALLOW_ANY_TARGET = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# Requests parsed while another is being answered wait in uvicorn's pipeline,
# and httptools parses a whole read: 100,000 34-byte GETs in one write queued
# 100,000 requests at ~1.6 KB each (164 MB for one connection, no key needed).
# Browsers do not pipeline and the clients that do keep a few in flight, so
# past this the rest of the connection's input is dropped: the queued ones are
# answered, then a 429 for the first one refused, and the connection closes.
MAX_PIPELINED = 32


class HeaderLimitProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing heads over ``max_header_bytes`` with 431."""

    max_header_bytes: ClassVar[int] = DEFAULT_MAX_HEADER_BYTES
    head_timeout_s: ClassVar[float] = HEAD_TIMEOUT_S

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._idle_bytes = 0  # fed since the last progress
        self._progressed = False  # in the piece being fed
        self._data_bytes = 0  # url + header names and values of this message
        self._overflow = False  # a callback stopped the parser for the cap
        self._in_head = True  # between messages or before headers complete
        self._refused = False
        self._pending: bytes | None = None  # an error answer waiting for the answers before it
        self._linger: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._running: RequestResponseCycle | None = None  # the cycle the app is serving
        self._reparse: bytes | None = None  # an Upgrade request's head, without the Upgrade
        self._codings: list[bytes] = []  # the Transfer-Encoding of the head being parsed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._linger, self._head_timer):
            if timer is not None:
                timer.cancel()
        self._linger = self._head_timer = None
        # uvicorn tells only its newest cycle. With requests pipelined behind
        # it, the one the app is serving (a live log tail, say) never heard of
        # the disconnect: it went on writing to the closed transport (uvloop
        # raises there: an unhandled_error) and held what it held till then.
        for cycle in (self._running, *(c for c, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if self._in_head and not busy and not self._refused:
            # Nothing to answer: an idle or crawling client. Its response
            # would be a 408 nobody reads; the fd is what matters.
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: the rest of a refused head is read and dropped
        self._unset_keepalive_if_required()
        # A stack, the next input last; each with whether it is a head that
        # passed the cap already (one parsed again: written with ": " and CRLF,
        # it can be longer than the client's "name:value" lines were).
        todo = [(memoryview(data), False)]
        while todo:
            view, checked = todo.pop()
            while view:
                room = len(view) if checked else self.max_header_bytes - self._idle_bytes
                if room <= 0:
                    self._refuse()
                    return
                if len(view) <= room:  # the usual case: all of it in one go
                    piece, view = view, view[:0]
                else:
                    piece, view = view[:room], view[room:]
                self._progressed = False
                try:
                    self.parser.feed_data(piece)
                except httptools.HttpParserUpgrade as exc:
                    head, self._reparse = self._reparse, None
                    if head is None:  # not from a head (on_headers_complete saw none)
                        self._bad_request("unexpected protocol upgrade")
                        return
                    # The parser stopped right after the head (it skipped the
                    # body): a fresh one takes the head without its Upgrade,
                    # then the body and whatever follows, as for any request.
                    # Views, not a joined copy: a read full of such requests
                    # would be copied once per request.
                    self.parser = self._new_parser()
                    self._idle_bytes = 0
                    todo += ((view, False), (piece[exc.args[0] :], False), (memoryview(head), True))
                    break
                except httptools.HttpParserError as exc:
                    if self._overflow:
                        self._refuse()
                        return
                    if not self._refused:  # else a callback has answered already
                        self._bad_request(str(exc))
                    return
                if not self._progressed and not checked:
                    self._idle_bytes += len(piece)
                # else what followed the last progress in this piece goes uncounted:
                # less than one piece, and _data_bytes still counts it exactly

    def _new_parser(self) -> httptools.HttpRequestParser:
        parser = httptools.HttpRequestParser(self)
        # As uvicorn's own (HttpToolsProtocol.__init__): answers a request
        # pipelined behind one with "Connection: close".
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
        return parser

    def _head_without_upgrade(self) -> bytes:
        """The head being parsed, as llhttp accepted it, minus its Upgrade headers."""
        version = self.parser.get_http_version().encode("ascii")
        out = [self.parser.get_method(), b" ", self.url, b" HTTP/", version, b"\r\n"]
        for name, value in self.headers:  # uvicorn's: names lower-cased
            if name != b"upgrade":
                out += [name, b": ", value, b"\r\n"]
        out.append(b"\r\n")
        return b"".join(out)

    # Parser callbacks (hot: they run for every request, so they count inline)

    def _progress(self) -> None:
        self._idle_bytes = 0
        self._progressed = True

    def _stop(self) -> None:
        self._overflow = True
        raise _HeadTooLarge

    def on_message_begin(self) -> None:
        self._data_bytes = 0
        self._in_head = True
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._data_bytes += len(url)
        if self._data_bytes > self.max_header_bytes:
            self._stop()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._data_bytes += len(name) + len(value)
        if self._data_bytes > self.max_header_bytes:
            self._stop()
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            self._codings += value.lower().replace(b" ", b"").split(b",")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._idle_bytes = 0
        self._progressed = True
        # Still "in the head" until uvicorn has taken the request: a refusal
        # from here on answers this message (else it would count as one the
        # app already has, and the client would get nothing at all).
        if self.parser.get_method() == b"CONNECT":
            # Not a proxy. llhttp hands CONNECT over as an upgrade, and uvicorn
            # cannot parse an authority-form target (example.com:443): it
            # raised in this callback and the connection closed unanswered.
            self._answer_and_close(
                405,
                "method_not_allowed",
                "CONNECT is not supported: the gateway is not a proxy",
                headers=((b"allow", ALLOW_ANY_TARGET),),
            )
            raise _Refused
        codings, self._codings = self._codings, []
        if any(c != b"chunked" for c in codings if c):
            # llhttp decodes the chunking and would pass "gzip, chunked" as if
            # the body were plain: a coding that cannot be applied is 501
            # (RFC 9112 §6.1), not a body handed over still encoded.
            self._answer_and_close(
                501,
                "not_implemented",
                "a Transfer-Encoding other than chunked is not supported",
            )
            raise _Refused
        if self.parser.should_upgrade():
            # No upgrade is supported, so none is made (RFC 9110 §7.8): httptools
            # now makes llhttp skip the body and stop (HttpParserUpgrade), and
            # data_received parses this head again without its Upgrade headers.
            # No cycle yet: the app gets the request from that second parse.
            self._reparse = self._head_without_upgrade()
            return
        if (
            self.cycle is not None
            and not self.cycle.response_complete
            and len(self.pipeline) >= MAX_PIPELINED
        ):
            self._refused = True  # the rest of the input is read and dropped
            self._pending = self._error(
                429,
                "too_many_pipelined",
                f"at most {MAX_PIPELINED} requests may wait behind the one being answered "
                "on a connection: send the rest on a new one",
            )
            raise _Refused
        try:
            super().on_headers_complete()
        except Exception as exc:
            # A target llhttp let through that uvicorn cannot take apart
            # (``GET http://host HTTP/1.1``: an absolute form without a path).
            self._bad_request(f"invalid request target ({type(exc).__name__})")
            raise _Refused from exc
        self._in_head = False

    def on_body(self, body: bytes) -> None:
        self._idle_bytes = 0
        self._progressed = True
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._progress()

    def on_chunk_complete(self) -> None:
        self._progress()

    def on_message_complete(self) -> None:
        if self._reparse is not None:
            return  # the bodiless end of an Upgrade request, to be parsed again
        self._arm_head_timer()  # for the next head on this connection
        self._in_head = True
        self._idle_bytes = 0
        self._progressed = True
        super().on_message_complete()

    def _refuse(self) -> None:
        log.warning(
            "headers_too_large",
            client=self.client[0] if self.client else None,
            limit=self.max_header_bytes,
        )
        if not self._in_head:
            # Trailers: the request is already with the app, so a 431 now
            # would answer it twice. Drop the connection; the app sees a
            # disconnect.
            self._refused = True
            self.transport.close()
            return
        self._answer_and_close(
            431,
            "headers_too_large",
            f"request line and headers exceed {self.max_header_bytes} bytes",
        )

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own is text/plain; every error of the API is JSON with a code.
        self._bad_request(msg)

    def _bad_request(self, reason: str) -> None:
        self.logger.warning("Invalid HTTP request received: %s", reason)
        # httptools' reasons are short ASCII phrases ("Invalid method
        # encountered"); bounded anyway, as they end up in a response.
        detail = reason.encode("ascii", "replace").decode()[:200] or "unparseable"
        self._answer_and_close(400, "bad_request", f"malformed HTTP request: {detail}")

    def _answer_and_close(
        self,
        status: int,
        code: str,
        message: str,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """Answer the message being parsed, if nothing else can still answer
        first, and close; otherwise just close (the app sees a disconnect)."""
        self._refused = True
        cycle = self.cycle
        if self._in_head:
            if cycle is not None and not cycle.response_complete and not self.pipeline:
                # A new message behind a request whose answer is still to be
                # written: ours goes after it (on_response_complete), else
                # the client would take it for that request's.
                self._pending = self._error(status, code, message, headers)
                return
            writable = cycle is None or cycle.response_complete
        else:
            # The body of the request the app has (a bad chunk size): ours is
            # its answer if the app has not begun one and it is not queued
            # behind another request.
            writable = cycle is not None and not cycle.response_started and not self.pipeline
        if not writable:
            self.transport.close()
            return
        if cycle is not None and not cycle.response_complete:
            # As if the connection were gone: the app's own answer, when it
            # comes, is dropped, and its reads see a disconnect.
            cycle.disconnected = True
            cycle.message_event.set()
        self._write_and_linger(self._error(status, code, message, headers))

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn's cycle is the newest: once it is complete, so is every
        # answer due before ours (a whole pipeline of them, past MAX_PIPELINED).
        if self._pending is None or (self.cycle is not None and not self.cycle.response_complete):
            return
        pending, self._pending = self._pending, None
        if not self.transport.is_closing():
            self._write_and_linger(pending)

    def _write_and_linger(self, answer: bytes) -> None:
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = self.loop.call_later(LINGER_S, self.transport.close)

    def _error(
        self, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> bytes:
        body = json.dumps(error_document(code, message), separators=(",", ":")).encode()
        head = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n",
                b"\r\n",
            ]
        )
        return b"".join(head) + body


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop httptools at the cap."""


class _Refused(Exception):
    """Raised in a parser callback that has answered the message: stops httptools."""


def header_limited_protocol(
    max_header_bytes: int, head_timeout_s: float = HEAD_TIMEOUT_S
) -> type[HeaderLimitProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""
    if not MIN_MAX_HEADER_BYTES <= max_header_bytes <= MAX_MAX_HEADER_BYTES:
        raise SettingsError(
            f"NSFAAS_MAX_HEADER_BYTES={max_header_bytes}: must be between "
            f"{MIN_MAX_HEADER_BYTES} and {MAX_MAX_HEADER_BYTES}"
        )
    limit, timeout = max_header_bytes, head_timeout_s

    class BoundHeaderLimitProtocol(HeaderLimitProtocol):
        max_header_bytes = limit
        head_timeout_s = timeout

    return BoundHeaderLimitProtocol
