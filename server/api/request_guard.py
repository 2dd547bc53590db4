"""Outermost middleware: counts every HTTP request by endpoint and status, tracks in-flight requests, stamps the
arrival time, and turns any exception that escaped the application into the fixed 500 answer (logged here with its
traceback, never sent)."""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dvd_serve.server.api.errors import internal_error_response
from dvd_serve.server.metrics import ServingMetrics

logger = logging.getLogger(__name__)

RECEIVED_AT_KEY = "dvd_received_at"
NO_RESPONSE_STATUS = "499"  # client went away before any answer (nginx's convention)


def received_at(request: Request) -> float:
    """`time.perf_counter()` when the request reached the gateway."""
    return getattr(request.state, RECEIVED_AT_KEY, None) or time.perf_counter()


class RequestGuardMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[RECEIVED_AT_KEY] = time.perf_counter()
        status: int | None = None

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.gateway_in_flight.inc()
        try:
            await self.app(scope, receive, send_and_note_status)
        except Exception:
            logger.exception("unhandled error serving %s %s", scope.get("method"), _endpoint(scope))
            if status is None:
                try:
                    await internal_error_response()(scope, receive, send_and_note_status)
                except OSError:
                    pass
        finally:
            self.metrics.gateway_in_flight.dec()
            self.metrics.requests.labels(_endpoint(scope), str(status) if status else NO_RESPONSE_STATUS).inc()


def _endpoint(scope: Scope) -> str:
    """The matched route's path template; never the raw path, which would let clients create label values.

    "unmatched" covers requests refused before routing (401, 413, 415) and paths without a route (404).
    """
    return getattr(scope.get("route"), "path", None) or "unmatched"
