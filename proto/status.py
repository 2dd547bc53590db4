"""How `ServingError`s cross the EmbeddingSink as gRPC statuses, in both directions.

The receiver aborts with a status code chosen by error class (and, for a few, by error code), the error's fixed
message, and the error code in trailing metadata. The sender maps the status code back to an error class with
its own fixed message; the trailing code only disambiguates RESOURCE_EXHAUSTED (a full store vs a message over
the size limit, which gRPC itself reports with the same status).
"""

from __future__ import annotations

import grpc

from dvd_serve.common.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    ServingError,
    UnavailableError,
)

ERROR_CODE_METADATA_KEY = "dvd-serve-error-code"
STORE_FULL_CODE = "embedding_store_full"
SINK_UNAVAILABLE_CODE = "embedding_sink_unavailable"  # the sink could not be reached, or let the push go

_STATUS_BY_ERROR_CODE: dict[str, grpc.StatusCode] = {
    "embedding_request_closed": grpc.StatusCode.FAILED_PRECONDITION,
    "embedding_push_superseded": grpc.StatusCode.ABORTED,
    "embedding_sink_unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
}
_STATUS_BY_ERROR_CLASS: tuple[tuple[type[ServingError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_for_error(error: ServingError) -> grpc.StatusCode:
    """The status the receiver answers an error with."""
    if error.code in _STATUS_BY_ERROR_CODE:
        return _STATUS_BY_ERROR_CODE[error.code]
    for error_class, status in _STATUS_BY_ERROR_CLASS:
        if isinstance(error, error_class):
            return status
    return grpc.StatusCode.INTERNAL


def error_for_status(status: grpc.StatusCode, error_code: str | None) -> ServingError:
    """The error a sender raises for a failed call; messages are fixed, never the peer's text."""
    if status == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError("language worker rejected the image embeddings", code="invalid_embeddings")
    if status == grpc.StatusCode.FAILED_PRECONDITION:
        return InvalidRequestError(
            "language worker no longer accepts embeddings for this request", code="embedding_request_closed"
        )
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(
            "image embeddings were not delivered before the deadline", code="embedding_deadline_exceeded"
        )
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED and error_code == STORE_FULL_CODE:
        return OverloadedError("language worker has no room for more image embeddings", code=STORE_FULL_CODE)
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return PayloadTooLargeError("image embeddings exceed the transport's size limit", code="embedding_too_large")
    if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED):
        return UnavailableError("language worker is unavailable", code=SINK_UNAVAILABLE_CODE)
    if status == grpc.StatusCode.UNAUTHENTICATED:
        return ServingError("language worker refused the vision worker's credentials", code="embedding_sink_auth")
    return ServingError("image embedding transfer failed", code="embedding_transfer_failed")
