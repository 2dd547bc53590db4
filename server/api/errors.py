"""Every error answer of the gateway in the one OpenAI shape, and the handlers that produce it.

Validation errors become 400 with `param` naming the field (`messages[0].content[1].image_url.url`) and a fixed
message built only from that path and our own schema constants; pydantic's text and the offending value are never
echoed. Unexpected exceptions become a fixed 500; their traceback goes to the server log only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dvd_serve.common.errors import InvalidRequestError, ServingError, error_body

MAX_PARAM_CHARS = 120
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Labels pydantic inserts into error locations for union members; never field names of our models.
_UNION_MEMBER_LABELS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})
_PRINTABLE_KEY = re.compile(r"[^A-Za-z0-9_.\-\[\]]")

# pydantic error type -> message template; `{param}` and the constraint names are the only substitutions.
_VALIDATION_MESSAGES: Mapping[str, str] = {
    "missing": "Missing required parameter '{param}'.",
    "extra_forbidden": "Unrecognized request argument supplied: '{param}'.",
    "greater_than_equal": "'{param}' must be greater than or equal to {ge}.",
    "greater_than": "'{param}' must be greater than {gt}.",
    "less_than_equal": "'{param}' must be less than or equal to {le}.",
    "less_than": "'{param}' must be less than {lt}.",
    "too_short": "'{param}' must not be empty.",
    "too_long": "'{param}' has too many items (at most {max_length}).",
    "string_too_short": "'{param}' must not be empty.",
    "finite_number": "'{param}' must be a finite number.",
    "literal_error": "Invalid value for '{param}'.",
    "unsupported_content_part": "Unsupported content part type at '{param}'.",
}
_VALIDATION_CODES: Mapping[str, str] = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
}
_SAFE_CONSTRAINTS = ("ge", "gt", "le", "lt", "max_length")


def error_response(error: ServingError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.http_status, headers=dict(headers or {}))


def internal_error_response(headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = error_body("Internal server error.", error_type="server_error", code="internal_error")
    return JSONResponse(body, status_code=500, headers=dict(headers or {}))


def param_from_location(location: Sequence[str | int], *, ends_with_unknown_key: bool = False) -> str | None:
    """`("body", "messages", 0, "part-list-content", 1, "image_url")` -> `messages[0].content[1].image_url`."""
    items = list(location[1:] if location and location[0] == "body" else location)
    unknown_key = items.pop() if ends_with_unknown_key and items else None
    names: list[str] = []
    for item in items:
        if isinstance(item, int):
            names.append(f"[{item}]")
        elif _IDENTIFIER.match(item) and item not in _UNION_MEMBER_LABELS:
            names.append(f".{item}")
    if unknown_key is not None:
        # A key the client sent that the schema does not know: kept, but made printable and short.
        names.append("." + _PRINTABLE_KEY.sub("?", str(unknown_key)))
    return "".join(names).lstrip(".")[:MAX_PARAM_CHARS] or None


def validation_error_to_serving_error(errors: Sequence[Mapping[str, Any]]) -> ServingError:
    """The first pydantic error as a client-safe `ServingError` (400)."""
    if not errors:
        return InvalidRequestError("Invalid request body.", code="invalid_request")
    first = errors[0]
    error_type = str(first.get("type", ""))
    if error_type == "json_invalid":
        return InvalidRequestError("The request body is not valid JSON.", code="invalid_json")
    location = tuple(first.get("loc", ()))
    param = param_from_location(location, ends_with_unknown_key=error_type == "extra_forbidden")
    if param is None:
        return InvalidRequestError("The request body must be a JSON object.", code="invalid_request")
    context = first.get("ctx") or {}
    constraints = {name: context[name] for name in _SAFE_CONSTRAINTS if isinstance(context.get(name), int | float)}
    template = _VALIDATION_MESSAGES.get(error_type, "Invalid type or value for '{param}'.")
    try:
        message = template.format(param=param, **constraints)
    except KeyError:
        message = f"Invalid value for '{param}'."
    return InvalidRequestError(message, code=_VALIDATION_CODES.get(error_type, "invalid_value"), param=param)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error_to_serving_error(exc.errors()))


async def _on_serving_error(request: Request, exc: ServingError) -> JSONResponse:
    return error_response(exc)


_HTTP_STATUS_ERRORS: Mapping[int, tuple[str, str]] = {
    404: ("Not found.", "not_found"),
    405: ("Method not allowed.", "method_not_allowed"),
    401: ("Missing or invalid API key.", "invalid_api_key"),
    413: ("Request body too large.", "request_too_large"),
    415: ("Unsupported request encoding.", "unsupported_media_type"),
}


def http_status_error_body(status_code: int) -> dict[str, Any]:
    message, code = _HTTP_STATUS_ERRORS.get(status_code, ("Request failed.", "http_error"))
    error_type = "invalid_request_error" if status_code < 500 else "server_error"
    return error_body(message, error_type=error_type, code=code)


async def _on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Starlette raises these for unrouted paths (404) and wrong methods (405, with an Allow header).
    return JSONResponse(
        http_status_error_body(exc.status_code), status_code=exc.status_code, headers=dict(exc.headers or {})
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(ServingError, _on_serving_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
