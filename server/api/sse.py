"""Server-sent events as OpenAI streams them: `data: <json>` events, then `data: [DONE]`.

`EventStreamResponse` differs from Starlette's `StreamingResponse` in one way that matters here: whatever the
ASGI server's spec version (Starlette stops watching from 2.4 on), it watches for the client's disconnect while
streaming, and it always closes the event iterator when done, so the pipeline iteration behind it is cancelled even
when the client leaves while the response is waiting to send.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Scope, Receive, Send

from dvd_serve.server.api.disconnect import wait_for_disconnect

DONE_EVENT = b"data: [DONE]\n\n"


def data_event(payload: str) -> bytes:
    """One SSE event carrying a JSON document (which never contains a raw newline)."""
    return b"data: " + payload.encode("utf-8") + b"\n\n"


class EventStreamResponse(StreamingResponse):
    def __init__(self, events: AsyncGenerator[bytes, None], headers: Mapping[str, str] | None = None) -> None:
        all_headers = {**(headers or {}), "cache-control": "no-cache"}
        super().__init__(events, media_type="text/event-stream", headers=all_headers)
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        disconnect = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, disconnect):
                task.cancel()
            await asyncio.gather(streaming, disconnect, return_exceptions=True)
            await self.events.aclose()
        failure = None if streaming.cancelled() else streaming.exception()
        if failure is not None and not isinstance(failure, OSError):  # OSError: the client went away mid-send
            raise failure
