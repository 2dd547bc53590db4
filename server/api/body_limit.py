"""Request bodies bounded before the application sees them.

A declared `Content-Length` over the limit is refused at once (413, nothing read); otherwise the body is read
chunk by chunk and refused as soon as the running total passes the limit (chunked uploads, lying lengths). Encoded
bodies (`Content-Encoding` other than identity) are refused with 415, since inflating them is how gzip bombs work.
The application then receives the body as one message; later `receive()` calls (disconnect detection) go to the
server as usual.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dvd_serve.common.errors import InvalidRequestError
from dvd_serve.server.api.errors import error_response, http_status_error_body


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._check_headers(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                await _too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replaying(b"".join(chunks), receive), send)

    def _check_headers(self, scope: Scope) -> JSONResponse | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.strip().isdigit():
                    return error_response(
                        InvalidRequestError("Invalid Content-Length header.", code="invalid_content_length")
                    )
                if int(value) > self.max_body_bytes:
                    return _too_large()
            elif name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                return JSONResponse(http_status_error_body(415), status_code=415)
        return None


def _too_large() -> JSONResponse:
    # The connection is closed afterwards so an unread remainder of the body is never buffered.
    return JSONResponse(http_status_error_body(413), status_code=413, headers={"Connection": "close"})


def _replaying(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
