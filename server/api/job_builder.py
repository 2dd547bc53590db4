"""An OpenAI chat request -> a `ChatJob`, with every check that can be decided before image work starts.

Reserved markers: the chat template and the vision placeholders (`<IMG_CONTEXT>`, `<img>`, `</img>`, `<image>`,
`<video>`, `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`) are special tokens to the tokenizer. Typed into a text
part they would forge image slots or turns, so a text part containing one (exact, case-sensitive) is REJECTED with
400 `reserved_token_in_text`; we do not rewrite the user's text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from dvd_serve.common.chat import ChatJob, ChatMessage, Detail, ImagePart, SamplingConfig, TextPart
from dvd_serve.common.errors import InvalidRequestError
from dvd_serve.server.api.image_refs import check_image_reference
from dvd_serve.server.api.protocol import ChatCompletionRequest, ChatMessageIn, ImageContentPart, TextContentPart
from dvd_serve.server.gateway_config import GatewayConfig

RESERVED_MARKERS = (
    "<IMG_CONTEXT>", "<img>", "</img>", "<image>", "<video>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
)
_RESERVED_PATTERN = re.compile("|".join(re.escape(marker) for marker in RESERVED_MARKERS))
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# OpenAI features dvd-serve does not implement, and the values that mean "not used" (None is always fine).
UNSUPPORTED_FEATURE_NOOPS: Mapping[str, Callable[[Any], bool]] = {
    "frequency_penalty": lambda value: value == 0,
    "presence_penalty": lambda value: value == 0,
    "logit_bias": lambda value: not value,
    "tools": lambda value: not value,
    "functions": lambda value: not value,
    "tool_choice": lambda value: value in ("none", "auto"),  # without tools both mean a plain text answer
    "function_call": lambda value: value in ("none", "auto"),
    "response_format": lambda value: value == {"type": "text"},
    "modalities": lambda value: value == ["text"],
    "reasoning_effort": lambda value: False,
}


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this gateway does not serve (HTTP 404, as OpenAI answers)."""

    http_status = 404


def build_chat_job(
    request: ChatCompletionRequest, *, request_id: str, config: GatewayConfig, model_id: str, max_model_len: int
) -> ChatJob:
    """Validates what the schema cannot and maps the request; raises `InvalidRequestError`s with `param` set."""
    if request.model != model_id:
        raise ModelNotFoundError("The model does not exist.", code="model_not_found", param="model")
    _check_unsupported_features(request)
    sampling = build_sampling(request, config, max_model_len)
    messages = build_messages(request.messages, config, request.max_tiles)
    return ChatJob(request_id=request_id, messages=messages, sampling=sampling, deadline_s=config.request_timeout_s)


def _invalid(message: str, param: str, code: str = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, code=code, param=param)


def _check_unsupported_features(request: ChatCompletionRequest) -> None:
    for name, is_noop in UNSUPPORTED_FEATURE_NOOPS.items():
        value = getattr(request, name)
        if value is not None and not is_noop(value):
            raise _invalid(f"'{name}' is not supported by this server.", name, code="unsupported_parameter")
    if request.n not in (None, 1):
        raise _invalid("Only n=1 is supported.", "n", code="unsupported_value")
    if request.stream_options is not None and not request.stream:
        raise _invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")


def build_sampling(request: ChatCompletionRequest, config: GatewayConfig, max_model_len: int) -> SamplingConfig:
    if (
        request.max_tokens is not None
        and request.max_completion_tokens is not None
        and request.max_tokens != request.max_completion_tokens
    ):
        raise _invalid("'max_tokens' and 'max_completion_tokens' disagree; send one.", "max_tokens")
    given_field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None and max_tokens >= max_model_len:
        raise _invalid(
            f"'{given_field}' must be less than the model's context length ({max_model_len}).",
            given_field,
            code="context_length_exceeded",
        )
    if request.top_logprobs is not None and not request.logprobs:
        raise _invalid("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    stop = request.stop
    return SamplingConfig(
        max_tokens=max_tokens or max(1, min(config.default_max_tokens, max_model_len - 1)),
        max_tokens_param=given_field if max_tokens is not None else None,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        ignore_eos=request.ignore_eos,
    )


def build_messages(
    messages: list[ChatMessageIn], config: GatewayConfig, request_max_tiles: int | None
) -> tuple[ChatMessage, ...]:
    if len(messages) > config.max_messages:
        raise _invalid(f"Too many messages (at most {config.max_messages}).", "messages")
    # Counted first, so a request with thousands of images is refused before any of them is looked at.
    image_count = sum(
        isinstance(part, ImageContentPart) for message in messages if isinstance(message.content, list)
        for part in message.content
    )
    if image_count > config.max_images_per_request:
        raise _invalid(
            f"Too many images (at most {config.max_images_per_request} per request).", "messages",
            code="too_many_images",
        )
    _check_tile_cap(request_max_tiles, "max_tiles", config)
    text_chars = 0
    built: list[ChatMessage] = []
    for message_index, message in enumerate(messages):
        param = f"messages[{message_index}].content"
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            parts: tuple[TextPart | ImagePart, ...] = (_text_part(message.content, param),)
        else:
            parts = tuple(
                _content_part(part, role, f"{param}[{part_index}]", config, request_max_tiles)
                for part_index, part in enumerate(message.content)
            )
        text_chars += sum(len(part.text) for part in parts if isinstance(part, TextPart))
        built.append(ChatMessage(role=role, parts=parts))
    if text_chars > config.max_text_chars:
        raise _invalid(
            f"The messages' text is too long (at most {config.max_text_chars} characters).", "messages",
            code="text_too_long",
        )
    return tuple(built)


def _content_part(
    part: TextContentPart | ImageContentPart,
    role: str,
    param: str,
    config: GatewayConfig,
    request_max_tiles: int | None,
) -> TextPart | ImagePart:
    if not isinstance(part, ImageContentPart):
        return _text_part(part.text, f"{param}.text")
    if role != "user":
        raise _invalid("Images are only allowed in user messages.", param)
    spec = part.image_url
    image_param = f"{param}.image_url"
    check_image_reference(spec.url, image_param)
    _check_tile_cap(spec.max_tiles, f"{image_param}.max_tiles", config)
    return ImagePart(
        url=spec.url,
        detail=Detail(spec.detail) if spec.detail else config.default_detail,
        max_tiles=spec.max_tiles if spec.max_tiles is not None else request_max_tiles,
        param=image_param,
    )


def _text_part(text: str, param: str) -> TextPart:
    marker = _RESERVED_PATTERN.search(text)
    if marker is not None:
        raise _invalid(
            f"Text may not contain the reserved marker '{marker.group(0)}'.", param, code="reserved_token_in_text"
        )
    if _LONE_SURROGATE.search(text):
        raise _invalid("Text contains invalid Unicode (a lone surrogate).", param)
    return TextPart(text=text)


def _check_tile_cap(max_tiles: int | None, param: str, config: GatewayConfig) -> None:
    if max_tiles is not None and max_tiles > config.max_tiles_per_image:
        raise _invalid(f"'max_tiles' may be at most {config.max_tiles_per_image}.", param)
