"""Probes and metrics: `/health` (liveness), `/ready` (every pool has a live replica), `/metrics` (Prometheus)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dvd_serve.server.api.state import gateway_state
from dvd_serve.server.metrics import EXPOSITION_CONTENT_TYPE

logger = logging.getLogger(__name__)

router = APIRouter()


@router.get("/health", responses={503: {"description": "Every language engine of a pool is dead."}})
async def health(request: Request) -> JSONResponse:
    """200 while the process serves HTTP and every pool of language engines has a live one; 503 otherwise, as
    vLLM's `/health` fails when its engine is dead. Draining does not fail it (see `/ready`)."""
    if not gateway_state(request).pipeline.engines_alive():
        return JSONResponse({"status": "engine_dead"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", responses={503: {"description": "At least one pool has no live replica."}})
async def ready(request: Request) -> JSONResponse:
    state = gateway_state(request)
    try:
        async with asyncio.timeout(state.config.readiness_timeout_s):
            pools = dict(await state.pipeline.readiness())
    except Exception:
        logger.exception("readiness probe of the pipeline failed")
        pools = {}
    for pool, is_ready in pools.items():
        state.metrics.pool_ready.labels(pool).set(1 if is_ready else 0)
    all_ready = bool(pools) and all(pools.values())
    body = {"status": "ready" if all_ready else "not_ready", "pools": pools}
    return JSONResponse(body, status_code=200 if all_ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(gateway_state(request).metrics.exposition(), media_type=EXPOSITION_CONTENT_TYPE)
