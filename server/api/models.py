"""`GET /v1/models` and `GET /v1/models/{model_id}`: the one model this gateway serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from dvd_serve.server.api.job_builder import ModelNotFoundError
from dvd_serve.server.api.protocol import ErrorResponse, ModelCard, ModelList
from dvd_serve.server.api.state import gateway_state

router = APIRouter()


def _served_model(request: Request) -> ModelCard:
    state = gateway_state(request)
    pipeline = state.pipeline
    return ModelCard(id=pipeline.model_id, created=state.started_at, max_model_len=pipeline.max_model_len)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_served_model(request)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    card = _served_model(request)
    if model_id != card.id:
        raise ModelNotFoundError("The model does not exist.", code="model_not_found")
    return card
