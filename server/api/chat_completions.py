"""`POST /v1/chat/completions`: validate, build the job, wait for the first delta, then answer JSON or SSE.

Waiting for the first delta before answering means failures that happen before any token (bad image, overload,
context overflow) get their real status code. Once a stream has started, failures become an error event followed
by `data: [DONE]`. A client that disconnects cancels the pipeline iteration in both modes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dvd_serve.common.chat import GenerationDelta, StageTimings
from dvd_serve.common.errors import InvalidRequestError, ServingError, error_body
from dvd_serve.server.api.completion_builder import ChunkFactory, CompletionAccumulator, completion_response
from dvd_serve.server.api.delta_stream import DeltaStream
from dvd_serve.server.api.disconnect import ClientDisconnected, unless_disconnected
from dvd_serve.server.api.errors import error_response, internal_error_response
from dvd_serve.server.api.job_builder import build_chat_job
from dvd_serve.server.api.protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, TokenLogprob
from dvd_serve.server.api.request_guard import received_at
from dvd_serve.server.api.sse import DONE_EVENT, EventStreamResponse, data_event
from dvd_serve.server.api.state import GatewayState, gateway_state
from dvd_serve.server.metrics import FinishedRequest, ServingMetrics

logger = logging.getLogger(__name__)

router = APIRouter()
CLIENT_CLOSED_STATUS = 499
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 256
_RETRY_LATER_STATUSES = (429, 503)
_ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 502, 503, 504)}


def timing_headers(timings: StageTimings | None) -> dict[str, str]:
    if timings is None:
        return {}
    return {
        "x-dvd-vision-ms": f"{timings.vision_s * 1000:.1f}",
        "x-dvd-queue-ms": f"{timings.queue_s * 1000:.1f}",
        "x-dvd-inference-ms": f"{timings.inference_s * 1000:.1f}",
        "x-dvd-visual-tokens": str(timings.visual_tokens),
    }


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **_ERROR_RESPONSES},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = gateway_state(request)
    try:
        client_id = client_request_id(request, body)
    except ServingError as error:
        return error_response(error)
    # As vLLM: the response id is `chatcmpl-<X-Request-Id header, else body request_id, else random>`, and the
    # header is echoed. Inside the pipeline the id must be unique, so a client-chosen one gets a random suffix.
    request_id = f"chatcmpl-{client_id or uuid.uuid4().hex}"
    pipeline_id = f"{request_id}-{uuid.uuid4().hex[:12]}" if client_id else request_id
    id_header = {REQUEST_ID_HEADER: request.headers.get(REQUEST_ID_HEADER) or request_id}
    started = received_at(request)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    try:
        job = await asyncio.to_thread(
            build_chat_job,
            body,
            request_id=pipeline_id,
            config=state.config,
            model_id=state.pipeline.model_id,
            max_model_len=state.pipeline.max_model_len,
        )
        result = CompletionAccumulator(top_logprobs=top_logprobs, n=job.sampling.n)
        deltas = DeltaStream(state.pipeline.generate(job), state.config.request_timeout_s)
        first = await unless_disconnected(request.receive, deltas.next())
        first_logprobs = result.add(first, state.pipeline.token_text, time.perf_counter())
        if body.stream:
            options = body.stream_options
            include_usage = options is not None and options.include_usage
            continuous = include_usage and options.continuous_usage_stats
            chunks = ChunkFactory(request_id, state.pipeline.model_id, include_usage, continuous)
            events = _stream_events(
                (first, first_logprobs), deltas, chunks, result, state, started, job.sampling.max_tokens
            )
            return EventStreamResponse(events, headers={**id_header, **timing_headers(first.timings)})
        await unless_disconnected(request.receive, _collect(deltas, result, state))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_STATUS, headers=id_header)
    except ServingError as error:
        return error_response(error, headers={**id_header, **_retry_headers(error, state)})
    except Exception:
        logger.exception("chat completion %s failed", request_id)
        return internal_error_response(headers=id_header)
    _record_finished(state.metrics, result, started, state.pipeline.model_id, job.sampling.max_tokens)
    response = completion_response(request_id, state.pipeline.model_id, int(time.time()), result)
    return JSONResponse(response.model_dump(mode="json"), headers={**id_header, **timing_headers(result.timings)})


def client_request_id(request: Request, body: ChatCompletionRequest) -> str | None:
    """The id the client chose: the `X-Request-Id` header, else the body's `request_id` (vLLM's order)."""
    header = request.headers.get(REQUEST_ID_HEADER)
    if header is None:
        return body.request_id
    if not 0 < len(header) <= MAX_REQUEST_ID_CHARS or not header.isprintable() or not header.isascii():
        raise InvalidRequestError(
            f"The X-Request-Id header must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters.",
            code="invalid_value", param="X-Request-Id",
        )
    return header


def _retry_headers(error: ServingError, state: GatewayState) -> dict[str, str]:
    if error.http_status in _RETRY_LATER_STATUSES:
        return {"retry-after": str(state.config.retry_after_s)}
    return {}


async def _collect(deltas: DeltaStream, result: CompletionAccumulator, state: GatewayState) -> None:
    while (delta := await deltas.next()) is not None:
        result.add(delta, state.pipeline.token_text, time.perf_counter())


async def _stream_events(
    first: tuple[GenerationDelta, list[TokenLogprob] | None],
    deltas: DeltaStream,
    chunks: ChunkFactory,
    result: CompletionAccumulator,
    state: GatewayState,
    started: float,
    max_tokens: int | None,
) -> AsyncGenerator[bytes, None]:
    metrics = state.metrics
    try:
        for index in range(result.n):
            yield data_event(chunks.role(index, result.choice_usage(index)))
        delta: GenerationDelta | None
        delta, logprobs = first
        while delta is not None:
            index = delta.index
            if delta.text or logprobs or delta.reasoning or delta.tool_calls:
                yield data_event(chunks.content(delta.text, logprobs, index, result.choice_usage(index),
                                                delta.reasoning, delta.tool_calls))
                metrics.observe_response_chunk(delta.made_at)
            if delta.finish_reason is not None:
                yield data_event(chunks.finish(delta.finish_reason, index, result.choice_usage(index)))
            delta = await deltas.next()
            logprobs = result.add(delta, state.pipeline.token_text, time.perf_counter()) if delta else None
        if chunks.include_usage:
            yield data_event(chunks.usage(result.usage))
        _record_finished(metrics, result, started, state.pipeline.model_id, max_tokens)
        yield DONE_EVENT
    except ServingError as error:
        metrics.stream_aborts.labels(error.code).inc()
        yield data_event(_json(error.to_body()))
        yield DONE_EVENT
    except Exception:
        logger.exception("stream %s failed", chunks.request_id)
        metrics.stream_aborts.labels("internal_error").inc()
        yield data_event(_json(error_body("Internal server error.", error_type="server_error", code="internal_error")))
        yield DONE_EVENT
    except BaseException:  # GeneratorExit / CancelledError: the client went away
        metrics.stream_aborts.labels("client_disconnected").inc()
        raise
    finally:
        await deltas.aclose()


def _json(document: dict) -> str:
    return json.dumps(document, separators=(",", ":"))


def _record_finished(
    metrics: ServingMetrics, result: CompletionAccumulator, started: float, model_name: str, max_tokens: int | None
) -> None:
    finished = time.perf_counter()
    metrics.vllm.observe(model_name, FinishedRequest(
        e2e_s=finished - started,
        ttft_s=None if result.first_content_at is None else result.first_content_at - started,
        prompt_tokens=result.prompt_tokens,
        generation_tokens=result.completion_tokens,
        per_choice_generation_tokens=tuple(choice.tokens for choice in result.choices),
        finish_reasons=tuple(choice.finish_reason for choice in result.choices if choice.finish_reason),
        inter_token_s=tuple(result.inter_token_s),
        n=result.n,
        max_tokens=max_tokens,
        queue_s=None if result.timings is None else result.timings.queue_s,
        inference_s=None if result.timings is None else result.timings.inference_s,
        cached_prompt_tokens=result.cached_prompt_tokens,
    ))
    metrics.e2e.observe(finished - started)
    metrics.prompt_tokens.inc(result.prompt_tokens)
    metrics.completion_tokens.inc(result.completion_tokens)
    if result.first_content_at is not None:
        metrics.ttft.observe(result.first_content_at - started)
        if result.completion_tokens > 1:
            metrics.tpot.observe((finished - result.first_content_at) / (result.completion_tokens - 1))
    if result.timings is not None:
        metrics.observe_stage_timings(result.timings)
