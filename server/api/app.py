"""`create_app(pipeline, config)`: the gateway's FastAPI application.

Middleware, outermost first: request guard (metrics, last-resort 500), CORS (only if origins are configured),
API keys, body limit. So unauthenticated requests are refused before their body is read, and every answer,
refusals included, is counted.
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from dvd_serve.server.api import chat_completions, health, models, tokenize
from dvd_serve.server.api.auth import ApiKeyMiddleware
from dvd_serve.server.api.body_limit import BodyLimitMiddleware
from dvd_serve.server.api.errors import install_error_handlers
from dvd_serve.server.api.request_guard import RequestGuardMiddleware
from dvd_serve.server.api.state import GatewayState
from dvd_serve.server.gateway_config import GatewayConfig
from dvd_serve.server.metrics import ServingMetrics
from dvd_serve.server.pipeline import ChatPipeline

TIMING_HEADERS = ("x-request-id", "x-dvd-vision-ms", "x-dvd-queue-ms", "x-dvd-inference-ms", "x-dvd-visual-tokens")


def create_app(
    pipeline: ChatPipeline, config: GatewayConfig, metrics: ServingMetrics | None = None
) -> FastAPI:
    """The app over `pipeline`; `metrics` defaults to a fresh registry (pass one to share it with workers)."""
    app = FastAPI(
        title="dvd-serve",
        summary="OpenAI-compatible chat completions for InternVL3.5 with decoupled vision serving.",
        docs_url=None,
        redoc_url=None,
    )
    app.router.redirect_slashes = False  # "/v1/models/" is a 404, not a redirect to a different path
    app.state.gateway = GatewayState(
        pipeline=pipeline, config=config, metrics=metrics or ServingMetrics(), started_at=int(time.time())
    )
    for router in (chat_completions.router, models.router, health.router, tokenize.router):
        app.include_router(router)
    install_error_handlers(app)

    # add_middleware puts each new one outside the previous ones.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.max_body_bytes)
    app.add_middleware(
        ApiKeyMiddleware,
        api_keys=tuple(key.get_secret_value() for key in config.api_keys),
        public_paths=config.public_paths,
    )
    if config.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
            expose_headers=list(TIMING_HEADERS),
        )
    app.add_middleware(RequestGuardMiddleware, metrics=app.state.gateway.metrics)
    return app
