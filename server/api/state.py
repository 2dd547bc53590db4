"""What every route of one app shares: the pipeline, the config and the metrics."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from dvd_serve.server.gateway_config import GatewayConfig
from dvd_serve.server.metrics import ServingMetrics
from dvd_serve.server.pipeline import ChatPipeline


@dataclass(frozen=True, slots=True)
class GatewayState:
    pipeline: ChatPipeline
    config: GatewayConfig
    metrics: ServingMetrics
    started_at: int  # unix seconds, reported as the model's `created`


def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gateway
