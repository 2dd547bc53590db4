"""The OpenAI-compatible HTTP API of the gateway: `create_app(pipeline, config)` builds it."""

from dvd_serve.server.api.app import create_app

__all__ = ["create_app"]
