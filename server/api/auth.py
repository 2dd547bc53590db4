"""Bearer API keys on every path except an exact list of public ones.

Protection is the default: a request is public only if its decoded path (`scope["path"]`, the one the router
matches) is exactly one of `public_paths` AND its raw, undecoded path is that same string. So `//health`,
`/health/`, `/./health`, `/health%2F..%2Fv1/models` and the like all need a key; path tricks can only make a public
path protected, never the reverse. Keys are compared in constant time against every configured key.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from dvd_serve.server.api.errors import http_status_error_body


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, *, api_keys: tuple[str, ...], public_paths: tuple[str, ...]) -> None:
        self.app = app
        self._keys = tuple(key.encode("utf-8") for key in api_keys)
        self._public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self._keys or self._is_public(scope):
            await self.app(scope, receive, send)
            return
        if self._key_matches(_bearer_token(scope)):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        response = JSONResponse(http_status_error_body(401), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _is_public(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        raw_path = scope.get("raw_path")
        raw_matches = raw_path is None or raw_path.decode("latin-1") == path
        return path in self._public_paths and raw_matches

    def _key_matches(self, token: bytes | None) -> bool:
        if token is None:
            return False
        matched = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(token, key)
        return matched


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None
