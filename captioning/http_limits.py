"""uvicorn's HTTP/1.1 protocol (h11) with the bounds it lacks: deadlines for receiving each request (its headers,
then its body at a minimum rate) and for a client to read its answers, a size limit on a request's head however
its bytes arrive, and a cap on the connections open at once. Also the one shape of every error the server answers,
`{"error": ...}`, uvicorn's own 400 for a request it cannot parse included, and one answer (505) for a request in
another HTTP version. OriginForm serves a request target in absolute-form as its path.

uvicorn (0.55) times out only a kept-alive connection that is idle after an answer, and any byte the client
sends cancels that timer. A client that connects and sends nothing, or half its headers, or its body a byte
at a time, held its connection for ever, so a few hundred of them (slowloris) held every connection the
server could take. ASGI middleware cannot help: the application is called only once the headers are in.
uvicorn's own `limit_concurrency` answers a plain-text 503 once the request's headers are in; here the refusal
is JSON like every other error, written as the connection opens. The answers written here go to the access log
in the shape of uvicorn's own lines, with what was received of a request that was never parsed.
"""
from __future__ import annotations

import logging
import re
import sys
from copy import copy
from dataclasses import dataclass
from functools import cached_property
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import h11
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame
from starlette.responses import JSONResponse
from uvicorn.logging import AccessFormatter
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from captioning.errors import clipped, one_line, without_credentials

# The client has sent all of its request: stop its clock (MUST_CLOSE: an HTTP/1.0 body that ended).
RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)
LINGER_S = 2.0  # how long a refused connection's request is read and dropped before the socket is closed
HEAD_MAX = 16 * 1024  # bytes of a request's line and headers (h11's default, given to it by serve)
HEAD_KEPT = 1024  # bytes of a request's start kept while its head arrives, to show it if it cannot be parsed
UVICORNS_400_WARNING = "Invalid HTTP request received."  # logged by uvicorn beside the access line of its 400


def error_response(status: int, message, headers: dict | None = None) -> JSONResponse:
    """A JSON `{"error": "<one line>"}`: what the server answers for every refusal."""
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def last_answer(status: int, message: str, headers: dict | None = None) -> bytes:
    """The bytes of a whole JSON error response, then the connection is closed: for a connection that no
    request cycle answers (a request that never arrived in full, that cannot be parsed, or over the cap)."""
    response = error_response(status, message, {"connection": "close", **(headers or {})})
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    head += [name + b": " + value for name, value in response.raw_headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + response.body


class Refusal(NamedTuple):
    """An answer the protocol writes itself, before or instead of the application's, and its access-log line."""
    status: int
    answer: bytes  # the whole response (last_answer)
    log_prefix: str = ""  # what the access line shows before the request line (or for it, with no request line)
    half_close: bool = True  # whether our side is closed (FIN) right after the answer, or only LINGER_S later


def refusal(status: int, message: str, log_prefix: str = "", headers: dict | None = None) -> Refusal:
    """A Refusal answering `message` (last_answer) with `status`."""
    return Refusal(status, last_answer(status, message, headers), log_prefix)


# The refusals of a request for what it is (head_refusal, BoundedH11Protocol.send_400_response); those worded with
# the limits (408, 503) are ProtocolLimits'.
# uvicorn answered a request it cannot parse in plain text; every other error is JSON
NOT_HTTP = refusal(400, "the request is not HTTP/1.1 the server can parse (request line or headers)",
                   "invalid request: ")


def not_http(reason: Exception | None) -> Refusal:
    """NOT_HTTP, saying what h11 found wrong (`reason`, its error) when it is known: the one answer to a missing
    Host header, two Content-Lengths that differ or a header line with a space in its name was the same sentence,
    naming no field."""
    if reason is None or not str(reason):
        return NOT_HTTP
    return refusal(400, f"the request is not HTTP/1.1 the server can parse: {printable(str(reason).encode())}",
                   NOT_HTTP.log_prefix)


# a head over HEAD_MAX (head_over_limit): big cookies, not a malformed request. RFC 6585 section 5.
HEAD_TOO_LARGE = refusal(431, f"the request's line and headers are over {HEAD_MAX // 1024} KB; send fewer or "
                              "smaller headers (cookies)", "headers too large: ")
# h11 (0.16) takes any HTTP/d.d, and uvicorn then answered, in HTTP/1.1, an HTTP/2 prior-knowledge preface
# (`PRI * HTTP/2.0`, then `SM`: a 404, then a 400 for the `SM`) or an HTTP/3.0 request line as if they were HTTP/1.1.
# RFC 9110 section 15.6.6: the 505 may say which versions the server supports.
HTTP1_ONLY = ("the server speaks HTTP/1.1 only (and 1.0); send the request in HTTP/1.1 (curl: without "
              "--http2-prior-knowledge)")
NOT_HTTP1 = refusal(505, HTTP1_ONLY)
# HTTP/2 with prior knowledge (`curl --http2-prior-knowledge`) reads the 505 as HTTP/2 frames: "Empty reply from
# server". It is answered in HTTP/2 instead: the server's preface (an empty SETTINGS frame), then the error
# HTTP_1_1_REQUIRED (RFC 9113 section 7), on the client's first stream when it has opened it (RST_STREAM: curl then
# sends its request again in HTTP/1.1, and gets its answer), else on the connection (GOAWAY). The first is awaited
# (H2_AWAITED): curl may send its preface before its request, and an RST_STREAM that came before it was a
# connection error ("Empty reply from server" in ~1 of 8 runs). Logged as the 505.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP_1_1_REQUIRED = 0xD  # the error code, RFC 9113 section 7
FRAME_HEADER_BYTES = 9  # length (3), type, flags, stream id (4): RFC 9113 section 4.1
# not half-closed: curl, reading the FIN with the RST_STREAM, dropped the connection without trying HTTP/1.1
H2_STREAM_1_REFUSED = Refusal(505, SettingsFrame(0).serialize() +
                              RstStreamFrame(1, error_code=HTTP_1_1_REQUIRED).serialize(), half_close=False)
H2_AWAITED = Refusal(505, b"")  # no answer yet: the client's first request is awaited (until --request-timeout)
# GOAWAY: the last stream processed (none: 0), the error, and a text for the client's debugging
H2_REFUSED = Refusal(505, SettingsFrame(0).serialize() + GoAwayFrame(
    0, last_stream_id=0, error_code=HTTP_1_1_REQUIRED, additional_data=HTTP1_ONLY.encode()).serialize())


def h2_opened_stream_1(buffered: bytes) -> bool:
    """Whether the HTTP/2 frames after the preface at the start of `buffered` hold the HEADERS that open stream 1:
    a client's first request, which RST_STREAM may then refuse (on a stream not opened it is a protocol error).
    A frame header hyperframe refuses ends the search: that client gets the GOAWAY."""
    at = len(H2_PREFACE)
    data = memoryview(buffered)
    while at + FRAME_HEADER_BYTES <= len(buffered):
        try:
            frame, length = Frame.parse_frame_header(data[at:at + FRAME_HEADER_BYTES])
        except HyperframeError:
            return False
        if isinstance(frame, HeadersFrame) and frame.stream_id == 1:
            return True
        at += FRAME_HEADER_BYTES + length
    return False


# a request line alone over HEAD_MAX: its URL, which RFC 9112 section 3 says MUST get a 414, not the 431 of headers
URI_TOO_LONG = refusal(414, f"the request's URL is over {HEAD_MAX // 1024} KB; send a shorter one (the fields of "
                            "/caption go in the body)", "URI too long: ")
# h11 fails on a request's body only when its chunked coding is malformed: its request line and headers were fine
BAD_CHUNKS = refusal(400, "the request body's chunked transfer coding is malformed; send it again",
                     "invalid chunked body: ")
BLANK_LINE = re.compile(rb"\n\r?\n")  # the end of a request head, as h11 finds it
EMPTY_LINE_BYTES = (b"\r", b"\n")  # what may come before a request line, to be dropped
# The request line of a version other than 1.x (h11's grammar otherwise: method, target, version)
OTHER_VERSION = re.compile(rb"[^ \r\n]+ [^ \r\n]+ HTTP/(?!1\.)[0-9]\.[0-9]\r?\n")


def printable(raw: bytes) -> str:
    """Bytes a client sent, as a log line may quote them: control characters (a bare line feed could forge a
    second log line), double quotes and non-ASCII bytes escaped as \\xNN, a URL's password hidden, and cut as
    `clipped` cuts."""
    escaped = without_credentials(raw.decode("latin-1")).encode("unicode_escape").decode("ascii")
    return clipped(escaped.replace('"', "\\x22"))


def head_over_limit(buffered: bytes) -> bool:
    """Whether the request head at the start of `buffered` is over HEAD_MAX bytes, arrived whole or not. h11's
    limit only counts a head still incomplete after a read, so a head that came in one read (up to 256 KB, what
    asyncio reads at once) was taken whole."""
    return len(buffered) > HEAD_MAX and not BLANK_LINE.search(buffered, 0, HEAD_MAX)


def head_refusal(buffered: bytes) -> Refusal | None:
    """The answer to the request head at the start of `buffered` if it is refused before h11 parses it: too long
    (a request line alone too long is its URL: RFC 9112 section 3's 414, not the 431 of headers), HTTP/2's preface
    (answered in HTTP/2), or a version other than HTTP/1.x."""
    if head_over_limit(buffered):
        return HEAD_TOO_LARGE if b"\n" in buffered[:HEAD_MAX] else URI_TOO_LONG
    if buffered.startswith(H2_PREFACE[:16]):  # its request line: `PRI * HTTP/2.0`
        if h2_opened_stream_1(buffered):
            return H2_STREAM_1_REFUSED
        return H2_REFUSED if len(buffered) > HEAD_MAX else H2_AWAITED  # frames without a request: bounded too
    if OTHER_VERSION.match(buffered):
        return NOT_HTTP1
    return None


def request_line(head: bytes) -> tuple[str, bool]:
    """The first line of a request head as received (printable), and whether it arrived whole."""
    line, ended, _ = head.partition(b"\n")
    return printable(line.removesuffix(b"\r")), bool(ended)


class OriginForm:
    """ASGI middleware serving a request target in absolute-form (`GET http://host:8000/health`, what a client sends
    through a proxy) as its path, with the target's host as the Host header: RFC 9112 section 3.2.2 says a server
    MUST accept it and use its host. uvicorn passed the whole URL on as the path, which no route had: a 404."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["raw_path"].startswith(b"/"):
            try:
                target = urlsplit(scope["raw_path"].decode("ascii"))  # uvicorn split the query string off already
            except ValueError:  # `http://[::1/health`, a bracket unclosed: it was a 500, with a traceback in the log
                return await self.not_a_url(scope, receive, send)
            if target.scheme.lower() in ("http", "https") and target.netloc:
                raw_path = (target.path or "/").encode("ascii")
                host = target.netloc.rpartition("@")[2].encode("ascii")  # without a user name and password
                headers = [(name, value) for name, value in scope["headers"] if name != b"host"]
                # in place: uvicorn's access line shows the path too, and no user name and password a URL held
                scope.update(raw_path=raw_path, path=unquote(target.path or "/"), headers=[*headers, (b"host", host)])
        await self.app(scope, receive, send)

    @staticmethod
    async def not_a_url(scope, receive, send):
        """A 400 for a request target that no URL parser takes, shown without a user name and password."""
        shown = without_credentials(scope["raw_path"].decode("ascii"))
        scope.update(raw_path=shown.encode("ascii"), path=shown)  # for uvicorn's access line too
        await error_response(400, f"the request target {clipped(shown)} is not a valid URL; send a path such as "
                                  "/health")(scope, receive, send)


class OneBodyLength:
    """ASGI middleware refusing a request that gives its body's length twice, by Transfer-Encoding and by
    Content-Length: a proxy in front that reads the other one sees the requests end elsewhere (request smuggling).
    RFC 9112 section 6.1 lets a server refuse it, and says it MUST close the connection after answering it; uvicorn
    answered it by its chunks and kept the connection open for the next request. Now a 400, then closed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and {b"transfer-encoding", b"content-length"} <= {name for name, _ in
                                                                                       scope["headers"]}:
            refused = error_response(400, "the request has both Transfer-Encoding and Content-Length; send one of "
                                          "them", {"connection": "close"})
            return await refused(scope, receive, send)
        await self.app(scope, receive, send)


class ProtocolAccessFormatter(AccessFormatter):
    """uvicorn's access lines, and the same shape for the answers the protocol writes itself: their records carry
    (client, what to show between the quotes, status), since a request that was never parsed has no method, path
    and version to show (uvicorn's shape made them `"- - HTTP/-"`)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if len(record.args) != 3:
            return super().formatMessage(record)
        client, shown, status = record.args
        record = copy(record)  # as uvicorn's: other handlers get the record as logged
        record.__dict__.update(client_addr=client, request_line=shown, status_code=self.get_status_code(int(status)))
        return super(AccessFormatter, self).formatMessage(record)  # uvicorn's level prefix and format


class WithoutUvicorns400Warning(logging.Filter):
    """Drops uvicorn's "Invalid HTTP request received." when the access log is on: the protocol's access line of
    that 400 says it, with the client and what it sent (one event, one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != UVICORNS_400_WARNING


@dataclass(frozen=True)
class ProtocolLimits:
    """The limits a BoundedH11Protocol holds its connections to, and its refusals worded with them (made once,
    on first use, for every connection)."""
    request_timeout_s: float
    max_connections: int
    min_body_rate: float  # bytes/s

    @cached_property
    def headers_late(self) -> Refusal:  # RFC 9110 section 15.5.9
        return refusal(408, f"the request's headers did not arrive within {self.request_timeout_s:g} s "
                            "(--request-timeout); send it again")

    @cached_property
    def body_late(self) -> Refusal:
        return refusal(408, f"the request body came slower than {self.min_body_rate / 1024:g} KB/s after its first "
                            f"{self.request_timeout_s:g} s (--min-body-rate, --request-timeout); send it again")

    @cached_property
    def too_many(self) -> Refusal:  # Retry-After: RFC 9110 section 10.2.3
        return refusal(503, f"the server has {self.max_connections} connections open (--max-connections); try again "
                            "shortly", "not read: over --max-connections", {"retry-after": "1"})


class BoundedH11Protocol(H11Protocol):
    """The headers of a request must arrive within `request_timeout_s` of the connection opening, or of the
    previous answer. Its body then has `request_timeout_s` too, and one second more for every
    `min_body_rate` bytes that arrive (Apache's mod_reqtimeout `body=T,MinRate=R`): a body of any allowed
    size can come at that rate, and a client that stalls or trickles is cut off within
    `request_timeout_s + max_body / min_body_rate`. The clock stops once the whole request has arrived, so
    reading a slow URL or captioning does not count. When it runs out, a client that sent part of a request
    gets a 408 (unless it was answered already) and the connection is closed; one that sent nothing is
    closed. A connection over `max_connections` is answered 503 at once, without waiting for its request.
    Every answer written here is in the access log too, as uvicorn writes the application's.

    uvicorn (0.55) makes one instance per connection from the class alone, so the limits are a class attribute,
    set by bounded_protocol on a subclass. What of uvicorn's H11Protocol is used beyond asyncio's Protocol
    methods: `connections` (the server's set of open ones, self included), `conn` (the h11.Connection, its
    `trailing_data` the bytes not parsed yet; replaced between requests by _skip_empty_lines), `cycle` (the request
    being answered), `handle_events` (called with each read, to parse it), `send_400_response` (called when h11
    cannot parse), `on_response_complete`, `_unsupported_upgrade_warning`, and `access_log`, `access_logger`,
    `logger`, `loop`, `client`, `config`."""

    limits: ProtocolLimits  # set by bounded_protocol

    _clock = None
    _unread_clock = None  # runs while the client leaves its answers unread (pause_writing)
    _deadline = 0.0
    _refused = False
    _head = b""  # the start of the request whose head is being received

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:  # self is counted: this one is over the cap
            self._answer_and_linger(self.limits.too_many)
        else:
            self._start_clock()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered already: what the client sends meanwhile is read and dropped
        in_body = self.conn.their_state is h11.SEND_BODY
        super().data_received(data)
        if self.conn.their_state in RECEIVED:
            self._stop_clock()
        elif not in_body:
            if self.conn.their_state is h11.SEND_BODY:  # the headers are in: the body's own clock
                self._start_clock()
        elif not self.cycle.response_started:  # a body answered already (a 413) earns no time
            self._deadline += len(data) / self.limits.min_body_rate

    def handle_events(self) -> None:
        """uvicorn calls it with each read to have h11 parse what has arrived. A request head that is arriving is
        refused here first when it is too long or not HTTP/1.x (head_refusal)."""
        answered_early = self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY
        if answered_early and not self._drop_answered_body():
            return
        if self.conn.their_state is h11.IDLE:
            self._skip_empty_lines()
            buffered = self.conn.trailing_data[0]  # what h11 holds unparsed: the head so far
            self._head = buffered[:HEAD_KEPT]  # h11 drops a head it cannot parse: keep its start to log
            refused = head_refusal(buffered)
            if refused is H2_AWAITED:
                return  # and not to h11, which took the preface for a request
            if refused:
                self._answer_and_linger(refused, self._shown_line())
                return
        super().handle_events()

    def _drop_answered_body(self) -> bool:
        """Read and drop the rest of the body of a request answered before it arrived (a 413 by its Content-Length),
        as uvicorn does, and start the next request here: uvicorn started it in its own loop, past the checks of
        handle_events, so the request after such a body was held to no 16 KB head limit, a CRLF before it got a
        400, and its access line showed the answered request. Whether the body has ended."""
        while (event := self._next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.EndOfMessage):
                self.transport.resume_reading()  # uvicorn paused it for a body over its high-water mark
                self.conn.start_next_cycle()
                return True
        return False

    def _next_event(self):
        """h11's next event, or NEED_DATA once a body it cannot parse has closed the connection (it was answered)."""
        try:
            return self.conn.next_event()
        except h11.RemoteProtocolError:
            self.transport.close()
            return h11.NEED_DATA

    def _skip_empty_lines(self) -> None:
        """Drop the empty lines (CRLF or LF) before a request line: RFC 9112 section 2.2 says a server SHOULD ignore
        at least one, and some clients send a CRLF after a request's body. h11 took one for a request without a
        request line: a 400. h11 has no public way to drop bytes it holds, so while no request is under way (both
        sides IDLE: a new Connection knows all this one does) it is replaced by one given the bytes that follow.
        A request line never starts with CR or LF, so only what would be a 400 is changed; a client that sends
        only empty lines is still cut off by --request-timeout, as the clock runs on."""
        buffered = self.conn.trailing_data[0]  # (uvicorn never tells h11 of the client's EOF: it closes instead)
        if buffered[:1] not in EMPTY_LINE_BYTES or self.conn.our_state is not h11.IDLE:
            return
        self.conn = h11.Connection(h11.SERVER, self.config.h11_max_incomplete_event_size or HEAD_MAX)
        rest = buffered.lstrip(b"\r\n")
        if rest:  # not b"": to h11 that is the client's EOF, and uvicorn then looped on h11's ConnectionClosed
            self.conn.receive_data(rest)

    def on_response_complete(self) -> None:
        self._start_clock()
        super().on_response_complete()  # may take in a pipelined request that had arrived whole
        if self.conn.their_state in RECEIVED:
            self._stop_clock()

    def connection_lost(self, exc) -> None:
        self._stop_clock()
        self._stop_unread_clock()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client has left so much of its answers unread that the socket's buffers are full. uvicorn waited
        for it to read on with no limit, so a client that pipelined requests and read none of the answers (a
        slow-read attack) held its connection, and its place under --max-connections, for good. It now has
        `request_timeout_s` to read on, or the connection is cut (our answers are a few KB: only a client that
        reads nothing fills the buffers)."""
        super().pause_writing()
        if self._unread_clock is None:
            self._unread_clock = self.loop.call_later(self.limits.request_timeout_s, self._cut_unread)

    def resume_writing(self) -> None:
        self._stop_unread_clock()
        super().resume_writing()

    def _stop_unread_clock(self) -> None:
        if self._unread_clock is not None:
            self._unread_clock.cancel()
            self._unread_clock = None

    def _cut_unread(self) -> None:
        self._unread_clock = None
        self.logger.warning("cut off %s: it read none of its answers for %g s (--request-timeout)",
                            get_client_addr({"client": self.client}), self.limits.request_timeout_s)
        self.transport.abort()  # close() would wait for the unread answers to be sent first

    def _unsupported_upgrade_warning(self) -> None:
        """Nothing: a request asking to upgrade (curl --http2 asks every plain-HTTP request for h2c) is answered
        in HTTP/1.1, as HTTP lets a server do. uvicorn logged two warnings for each, the second telling the
        operator to install a WebSocket library, which this server, with no WebSocket route, has no use for."""

    def send_400_response(self, msg: str) -> None:
        """h11 cannot parse what the client sent: a request's head, or the chunks of its body. Once the request
        has been answered (a 413 for a chunked body over the limit), the connection is only closed: a second
        answer to one request followed the first."""
        if self.conn.our_state is h11.IDLE:  # no request parsed
            # uvicorn calls this while it handles h11's RemoteProtocolError, whose text says what is wrong
            self._answer_and_linger(not_http(sys.exc_info()[1]), self._shown_line())
        elif self.conn.our_state is h11.SEND_RESPONSE:  # its head was parsed and is not answered yet
            self._answer_and_close(BAD_CHUNKS, self._parsed_request_line())
        else:
            self.transport.close()

    def _answer_and_linger(self, refused: Refusal, line: str = "") -> None:
        """Answer a connection whose request no request cycle holds (not read, its head refused or unparsable)
        and close our side. The rest of the client's request may still be on its way: read and dropped for up
        to LINGER_S, since closing a socket with unread data sends a reset, which can destroy the answer before
        the client reads it (a 200 KB head got a reset for its 431). Meanwhile the connection no longer counts
        against the cap: it holds no request, and a burst of refused ones kept the good clients after it out
        for LINGER_S more."""
        self._refused = True
        self._stop_clock()
        self.connections.discard(self)
        self._answer(refused, line)
        if refused.half_close:
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _answer_and_close(self, refused: Refusal, line: str) -> None:
        """Answer a request whose body was awaited, and close: the request cycle holds the connection until then
        (an application reading the body gets http.disconnect)."""
        self._answer(refused, line)
        self.transport.close()

    def _answer(self, refused: Refusal, line: str) -> None:
        """Write the answer, and an access log line for it in the shape of uvicorn's for the application's
        (ProtocolAccessFormatter): `line` is the request line, or what stands for it."""
        self.transport.write(refused.answer)
        if self.access_log:
            self.access_logger.info('%s - "%s" %d', get_client_addr({"client": self.client}), refused.log_prefix + line,
                                    refused.status)

    def _parsed_request_line(self) -> str:
        """The request line of the request whose body is awaited, as uvicorn's access lines show it."""
        scope = self.cycle.scope
        return f"{scope['method']} {get_path_with_query_string(scope)} HTTP/{scope['http_version']}"

    def _shown_line(self) -> str:
        """The first line of the request whose head is arriving, as the access log shows it."""
        return request_line(self._head)[0]

    def _received_request_line(self) -> str:
        """As much as arrived of the first line of a request whose head did not arrive in full."""
        line, whole = request_line(self._head)
        return line if whole else f"incomplete request line: {line}"

    def _start_clock(self) -> None:
        self._stop_clock()
        if not self.transport.is_closing():
            self._deadline = self.loop.time() + self.limits.request_timeout_s
            self._clock = self.loop.call_at(self._deadline, self._tick)

    def _stop_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None

    def _tick(self) -> None:
        if self.loop.time() < self._deadline:  # the body's bytes pushed the deadline back meanwhile
            self._clock = self.loop.call_at(self._deadline, self._tick)
            return
        self._clock = None
        state = self.conn.their_state
        if state is h11.IDLE and head_refusal(self.conn.trailing_data[0]) is H2_AWAITED:  # no HTTP/2 request came
            self._answer_and_linger(H2_REFUSED, self._shown_line())
        elif state is h11.IDLE and self.conn.trailing_data[0]:  # part of the headers
            self._answer_and_linger(self.limits.headers_late, self._received_request_line())
        elif state is h11.SEND_BODY and not self.cycle.response_started:
            self._answer_and_close(self.limits.body_late, self._parsed_request_line())
        else:
            self.transport.close()  # an application waiting for the body gets http.disconnect


def bounded_protocol(request_timeout_s: float, max_connections: int, min_body_rate: float) -> type[H11Protocol]:
    """The protocol class to give uvicorn.Config(http=...), with these limits (`min_body_rate` in bytes/s): a
    subclass of BoundedH11Protocol that only binds them, since uvicorn builds each connection's protocol from the
    class it is given."""
    limits = ProtocolLimits(request_timeout_s, max_connections, min_body_rate)
    return type(BoundedH11Protocol.__name__, (BoundedH11Protocol,), {"limits": limits})
