"""The one error type every component raises for expected failures, and its OpenAI-style JSON shape.

Messages are fixed strings chosen by us (never exception text from a library), so no traceback, memory address,
file path or internal host can reach a client. `param` names the offending request field where there is one,
e.g. `messages[0].content[1].image_url`.
"""

from __future__ import annotations

from typing import Any


class ServingError(Exception):
    """An expected failure with a client-safe message. Subclasses fix the HTTP status and OpenAI error type."""

    http_status: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param

    def __reduce__(self):
        # Keyword-only `code`/`param` need an explicit recipe to cross process boundaries (Ray, multiprocessing).
        return (_rebuild, (type(self), self.message, self.code, self.param))

    def with_param(self, param: str) -> "ServingError":
        """The same error attributed to a request field (e.g. once the gateway knows which content part failed)."""
        return type(self)(self.message, code=self.code, param=param)

    def to_body(self) -> dict[str, Any]:
        return error_body(self.message, error_type=self.error_type, code=self.code, param=self.param)


class InvalidRequestError(ServingError):
    """The client sent something we will not process (HTTP 400)."""

    http_status = 400
    error_type = "invalid_request_error"


class PayloadTooLargeError(InvalidRequestError):
    """A body, image or tensor exceeds a configured limit (HTTP 413)."""

    http_status = 413


class OverloadedError(ServingError):
    """Admission control refused the request; retry later (HTTP 429)."""

    http_status = 429
    error_type = "rate_limit_error"


class UpstreamError(ServingError):
    """A remote origin (image URL) failed (HTTP 502)."""

    http_status = 502
    error_type = "upstream_error"


class DeadlineExceededError(ServingError):
    """The request ran past its deadline (HTTP 504)."""

    http_status = 504
    error_type = "timeout_error"


class UnavailableError(ServingError):
    """No healthy replica can take the work now (HTTP 503)."""

    http_status = 503
    error_type = "service_unavailable_error"


def error_body(message: str, *, error_type: str, code: str, param: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, the shape OpenAI clients parse."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _rebuild(cls: type[ServingError], message: str, code: str, param: str | None) -> ServingError:
    return cls(message, code=code, param=param)
