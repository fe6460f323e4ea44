"""uvicorn's HTTP/1.1 protocol (h11) with the two bounds it lacks: a deadline for receiving each request, and a
cap on the connections open at once. Also the one shape of every error the server answers, `{"error": ...}`,
uvicorn's own 400 for a request it cannot parse included.

uvicorn (0.55) times out only a kept-alive connection that is idle after an answer, and any byte the client
sends cancels that timer. A client that connects and sends nothing, or half its headers, or its body a byte
at a time, held its connection for ever, so a few hundred of them (slowloris) held every connection the
server could take. ASGI middleware cannot help: the application is called only once the headers are in.
uvicorn's own `limit_concurrency` answers a plain-text 503; here the refusal is JSON like every other error.
"""
from __future__ import annotations

from http import HTTPStatus

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from captioning.errors import one_line

# The client has sent all of its request: stop its clock (MUST_CLOSE: an HTTP/1.0 body that ended).
RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


def error_response(status: int, message, headers: dict | None = None) -> JSONResponse:
    """A JSON `{"error": "<one line>"}`: what the server answers for every refusal."""
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def last_answer(status: int, message: str) -> bytes:
    """The bytes of a whole JSON error response, then the connection is closed: for a connection that no
    request cycle answers (a request that never arrived in full, or that cannot be parsed)."""
    response = error_response(status, message, {"connection": "close"})
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    head += [name + b": " + value for name, value in response.raw_headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + response.body


# uvicorn answered a request it cannot parse in plain text; every other error is JSON
NOT_HTTP = last_answer(400, "the request is not HTTP/1.1 the server can parse (request line or headers)")


def bounded_protocol(request_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """The protocol class to give uvicorn.Config(http=...), with these limits."""
    timed_out = last_answer(408, f"the request did not arrive in full within {request_timeout_s:g} s "
                                 "(--request-timeout); send it again")
    too_many = error_response(
        503, f"the server has {max_connections} connections open (--max-connections); try again shortly",
        {"connection": "close", "retry-after": "1"})

    class BoundedH11Protocol(H11Protocol):
        """A connection's clock starts when it opens and again after each answer (for the next request, or the
        rest of a body the answer did not wait for); it stops once the whole request has arrived, so reading
        a slow URL or captioning does not count. When it runs out, a client that sent part of a request gets
        a 408 (unless it was answered already) and the connection is closed; one that sent nothing is closed."""

        _clock = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:  # self is counted: this one is over the cap
                self.app = too_many  # answered, and closed, as soon as its request's headers are in
            self._start_clock()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._stop_clock_if_received()

        def on_response_complete(self) -> None:
            self._start_clock()
            super().on_response_complete()  # may take in a pipelined request that had arrived whole
            self._stop_clock_if_received()

        def connection_lost(self, exc) -> None:
            self._stop_clock()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self.transport.write(NOT_HTTP)
            self.transport.close()

        def _start_clock(self) -> None:
            self._stop_clock()
            if not self.transport.is_closing():
                self._clock = self.loop.call_later(request_timeout_s, self._time_out)

        def _stop_clock(self) -> None:
            if self._clock is not None:
                self._clock.cancel()
                self._clock = None

        def _stop_clock_if_received(self) -> None:
            if self.conn.their_state in RECEIVED:
                self._stop_clock()

        def _time_out(self) -> None:
            self._clock = None
            state = self.conn.their_state
            headers_partly_in = state is h11.IDLE and bool(self.conn.trailing_data[0])
            body_awaited = state is h11.SEND_BODY and not self.cycle.response_started
            if headers_partly_in or body_awaited:
                self.transport.write(timed_out)
            self.transport.close()  # an application waiting for the body gets http.disconnect

    return BoundedH11Protocol
