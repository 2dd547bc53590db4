"""Settings of the public HTTP gateway: where it listens, who may call it and the limits it enforces early."""

from __future__ import annotations

import posixpath

from pydantic import Field, SecretStr, field_validator

from dvd_serve.common.chat import Detail
from dvd_serve.common.config import FrozenConfig

MIB = 1024 * 1024


class GatewayConfig(FrozenConfig):
    """One per gateway process. Every limit here is checked before any image is fetched or decoded."""

    host: str = Field(default="0.0.0.0", description="Interface the HTTP server binds to.")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port the HTTP server listens on.")
    api_keys: tuple[SecretStr, ...] = Field(
        default=(),
        description="Accepted `Authorization: Bearer <key>` values. Empty turns authentication off. Every path "
        "outside `public_paths` requires a key.",
    )
    public_paths: tuple[str, ...] = Field(
        default=("/health", "/ready"),
        description="Exact request paths served without a key. `/metrics` and `/openapi.json` are protected unless "
        "listed here (e.g. add `/metrics` for a Prometheus scraper without credentials).",
    )
    cors_allow_origins: tuple[str, ...] = Field(
        default=(), description="Origins allowed by CORS. Empty means no CORS headers at all (browsers blocked)."
    )
    max_body_bytes: int = Field(
        default=32 * MIB,
        ge=1024,
        description="Largest request body accepted; larger ones get 413 before more than this is read.",
    )
    max_request_head_bytes: int = Field(
        default=64 * 1024,
        ge=4096,
        description="Largest HTTP request head (request line and all headers); larger ones get 431 and the "
        "connection is closed.",
    )
    request_head_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        description="Seconds a client has to send a complete request head from its first byte (or from opening "
        "the connection); slower ones get 408 and the connection is closed (slowloris).",
    )
    max_images_per_request: int = Field(default=16, ge=0, description="Most `image_url` parts in one request.")
    max_messages: int = Field(default=512, ge=1, description="Most messages in one request.")
    max_tools: int = Field(
        default=128, ge=1,
        description="Most tools in one request (OpenAI's limit); each becomes part of the prompt and of the "
        "constraint a forced call compiles.",
    )
    max_text_chars: int = Field(
        default=400_000, ge=1, description="Most characters over all text parts of one request."
    )
    max_tiles_per_image: int = Field(
        default=12, ge=1, description="Highest `max_tiles` a request may ask for (InternVL's max_dynamic_patch)."
    )
    default_detail: Detail = Field(
        default=Detail.AUTO, description="`detail` used for image parts that do not name one."
    )
    max_n: int = Field(
        default=16, ge=1, description="Highest `n` (choices per request) a request may ask for; more is a 400."
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0.0, description="Seconds a chat request may run in total before it is answered 504."
    )
    readiness_timeout_s: float = Field(
        default=5.0, gt=0.0, description="Seconds `/ready` waits for the pipeline's pool states before 503."
    )
    retry_after_s: int = Field(
        default=1, ge=0, description="`Retry-After` header value sent with 429 and 503 answers."
    )

    @field_validator("public_paths")
    @classmethod
    def _paths_are_canonical(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for path in paths:
            canonical = posixpath.normpath(path) if path.startswith("/") else ""
            if path != canonical or path.startswith("//"):
                raise ValueError(f"public path {path!r} is not an absolute, normalised path without trailing slash")
        return paths

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, keys: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        if any(not key.get_secret_value().strip() for key in keys):
            raise ValueError("api_keys must not contain empty keys")
        return keys
