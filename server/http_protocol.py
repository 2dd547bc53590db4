"""The gateway's HTTP/1.1 connection handling: uvicorn's h11 protocol with a bounded request head.

uvicorn on its own bounds neither the time a client may take to send a request head (its keep-alive timeout only
runs between requests, so a client dripping header lines holds a connection forever) nor, with its default
parser, the head's size. Here:
- a request head must arrive completely within `head_timeout_s` of its first byte (or of the connection opening);
  otherwise the connection is answered 408 and closed;
- h11 refuses a head larger than `max_head_bytes` (one huge header or thousands of small ones): 431, closed;
- a head h11 cannot parse: 400, closed.
Every such answer carries the one OpenAI error shape with a fixed message.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from dvd_serve.common.errors import error_body

_STATUS_LINES = {400: b"400 Bad Request", 408: b"408 Request Timeout", 431: b"431 Request Header Fields Too Large"}
_HEAD_ERRORS = {
    400: ("Invalid HTTP request.", "invalid_http_request"),
    408: ("The request head was not received in time.", "request_head_timeout"),
    431: ("Request header fields too large.", "request_header_too_large"),
}


def head_error_response(status: int) -> bytes:
    """A complete `Connection: close` answer for a request whose head was refused (status 400, 408 or 431)."""
    message, code = _HEAD_ERRORS[status]
    body = json.dumps(error_body(message, error_type="invalid_request_error", code=code)).encode()
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
        _STATUS_LINES[status], len(body)
    )
    return head + body


class BoundedHeadH11Protocol(H11Protocol):
    """Set `head_timeout_s` and `max_head_bytes` on a subclass (see `bounded_head_protocol`)."""

    head_timeout_s: float = 10.0
    max_head_bytes: int = 64 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()  # the first bytes of a kept-alive connection's next request
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_head_deadline()  # the head is complete (or refused)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this for every head h11 refuses; its own answer is plain text.
        self._disarm_head_deadline()
        oversized = len(self.conn.trailing_data[0]) > self.max_head_bytes
        self.transport.write(head_error_response(431 if oversized else 400))
        self.transport.close()

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._on_head_timeout)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _on_head_timeout(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(head_error_response(408))
            self.transport.close()


def bounded_head_protocol(head_timeout_s: float, max_head_bytes: int) -> type[BoundedHeadH11Protocol]:
    """The protocol class to pass as uvicorn's `http`, with `h11_max_incomplete_event_size=max_head_bytes`."""
    return type(
        "GatewayH11Protocol",
        (BoundedHeadH11Protocol,),
        {"head_timeout_s": head_timeout_s, "max_head_bytes": max_head_bytes},
    )
