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

from dvd_serve.common.chat import (
    AnswerOptions, ChatJob, ChatMessage, Detail, ImagePart, PromptOptions, SamplingConfig, TextPart,
)
from dvd_serve.common.errors import InvalidRequestError
from dvd_serve.server.api.image_refs import check_image_reference
from dvd_serve.server.api.protocol import (
    ChatCompletionRequest, ChatMessageIn, ImageContentPart, RefusalContentPart, TextContentPart,
)
from dvd_serve.server.gateway_config import GatewayConfig

RESERVED_MARKERS = (
    "<IMG_CONTEXT>", "<img>", "</img>", "<image>", "<video>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
)
_RESERVED_PATTERN = re.compile("|".join(re.escape(marker) for marker in RESERVED_MARKERS))
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

_NOT_USED = (None, False, 0, "", [], {})


def _only(*values: Any) -> Callable[[Any], bool]:
    return lambda value: any(value == allowed and type(value) is type(allowed) for allowed in values)


def _unset(value: Any) -> bool:
    return any(value == nothing and type(value) is type(nothing) for nothing in _NOT_USED)


_LEGACY_FUNCTIONS = "the deprecated function-call form is not supported; use 'tools'"
# Features of OpenAI and of vLLM's chat API that dvd-serve does not implement: the test for the values that mean
# "not used" (None is always fine; vLLM's own default is always one of them) and why any other value is refused.
REFUSED_FEATURES: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (_unset, _LEGACY_FUNCTIONS),
    "function_call": (_only("none", "auto"), _LEGACY_FUNCTIONS),
    "modalities": (lambda value: value == ["text"], "only text output is supported"),
    "thinking_token_budget": (_unset, "a thinking-token budget is not supported"),
    "use_beam_search": (_unset, "beam search is not supported"),
    "length_penalty": (_only(1, 1.0), "it applies to beam search, which is not supported"),
    "watermarking": (_unset, "watermarking is not supported"),
    "truncate_prompt_tokens": (_unset, "prompts are never truncated; an oversized prompt is a 400"),
    "truncation_side": (_unset, "prompts are never truncated; an oversized prompt is a 400"),
    "prompt_logprobs": (_unset, "prompt log-probabilities are not supported"),
    "logprob_token_ids": (_unset, "log-probabilities of chosen token ids are not supported; use top_logprobs"),
    "echo": (_unset, "echoing the prompt is not supported"),
    "add_special_tokens": (_unset, "the chat template adds the special tokens"),
    "chat_template": (_unset, "the checkpoint's own chat template is always used"),
    "media_io_kwargs": (_unset, "media loading options are not supported"),
    "return_tokens_as_token_ids": (_unset, "tokens are returned as text"),
    "return_token_ids": (_unset, "token ids are not returned"),
    "routed_experts_prompt_start": (_unset, "routed-expert data is not returned"),
    "return_token_offsets": (_unset, "token offsets are not returned"),
    "return_prompt_text": (_unset, "the prompt text is not returned"),
    "mm_payload": (_only("tensors"), "it applies to vLLM's render endpoints only"),
    "return_mm_kwargs": (_unset, "it applies to vLLM's render endpoints only"),
    "cache_salt": (_unset, "prefix-cache salting is not supported"),
    "kv_transfer_params": (_unset, "KV transfer is not supported"),
    "ec_transfer_params": (_unset, "encoder-cache transfer is not supported"),
    "vllm_xargs": (_unset, "custom vLLM extensions are not supported"),
    "repetition_detection": (_unset, "repetition detection is not supported"),
    "stream_interval": (_only(1), "chunks are streamed as soon as tokens are ready"),
}
# `response_format.type` values: OpenAI's, and vLLM's structural tags.
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "structural_tag")
# `mm_processor_kwargs` keys that are honoured (InternVL's processor option, as the per-request tile cap).
MM_PROCESSOR_KWARGS = ("max_dynamic_patch",)
# Roles whose messages may carry no `content` (OpenAI allows it for assistant messages with tool calls).
_CONTENT_OPTIONAL_ROLES = ("assistant",)
# Keys of a tool's JSON schema that make it something other than an object schema when `type` is absent.
_NON_OBJECT_SCHEMA_KEYS = ("items", "enum", "const", "prefixItems")


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
    answer = build_answer_options(request, config)
    max_tiles = _request_max_tiles(request, config)
    messages = build_messages(request.messages, config, max_tiles)
    return ChatJob(
        request_id=request_id,
        messages=messages,
        sampling=sampling,
        deadline_s=config.request_timeout_s,
        prompt_options=build_prompt_options(request),
        priority=request.priority,
        answer=answer,
    )


def build_answer_options(request: ChatCompletionRequest, config: GatewayConfig) -> AnswerOptions:
    """Tools, tool choice and reasoning settings, checked as vLLM's request model checks them and more strictly
    where vLLM would fail later (a tool schema that is not an object, duplicate tool names)."""
    tools = request.tools
    if tools is not None and not tools:
        raise _invalid("'tools' must not be an empty array; omit it instead.", "tools")
    if tools is not None and len(tools) > config.max_tools:
        raise _invalid(f"Too many tools (at most {config.max_tools}).", "tools", code="too_many_tools")
    names: set[str] = set()
    for index, tool in enumerate(tools or ()):
        param = f"tools[{index}].function"
        if tool.function.name in names:
            raise _invalid(f"Two tools are named '{tool.function.name}'.", f"{param}.name")
        names.add(tool.function.name)
        _check_object_schema(tool.function.parameters, f"{param}.parameters")
    choice = request.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise _invalid("'tool_choice' needs 'tools'.", "tool_choice")
    if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
        raise _invalid(f"'tool_choice' names '{choice.function.name}', which is not in 'tools'.",
                       "tool_choice.function.name")
    return AnswerOptions(
        tools=tuple(tool.model_dump(exclude_unset=True) for tool in tools or ()),
        tool_choice=choice if isinstance(choice, str) or choice is None else choice.model_dump(),
        parallel_tool_calls=request.parallel_tool_calls,
        include_reasoning=request.include_reasoning,
        reasoning_effort=request.reasoning_effort,
        streamed=request.stream,
    )


def _check_object_schema(schema: dict[str, Any] | None, param: str) -> None:
    if schema is None:
        return
    kind = schema.get("type")
    if kind is None and not any(key in schema for key in _NON_OBJECT_SCHEMA_KEYS):
        return  # {} or {"properties": ...}: an object schema by what it describes
    if kind != "object":
        raise _invalid("A tool's 'parameters' must be a JSON schema of type 'object'.", param)
    if not isinstance(schema.get("properties", {}), dict):
        raise _invalid("A tool's 'parameters.properties' must be an object.", f"{param}.properties")


def build_prompt_options(request: ChatCompletionRequest) -> PromptOptions:
    """The chat-template settings of `request`, as vLLM's `build_chat_params` gathers them."""
    if request.add_generation_prompt and request.continue_final_message:
        raise _invalid(
            "Cannot set both 'continue_final_message' and 'add_generation_prompt' to true.", "continue_final_message"
        )
    kwargs = dict(request.chat_template_kwargs or {})
    for reserved in ("chat_template", "tokenize", "messages", "conversation", "tools", "return_dict"):
        if reserved in kwargs:
            raise _invalid(f"'chat_template_kwargs' may not set '{reserved}'.", f"chat_template_kwargs.{reserved}")
    return PromptOptions(
        add_generation_prompt=request.add_generation_prompt,
        continue_final_message=request.continue_final_message,
        documents=tuple(request.documents) if request.documents is not None else None,
        template_kwargs=tuple(kwargs.items()),
    )


def _request_max_tiles(request: ChatCompletionRequest, config: GatewayConfig) -> int | None:
    """The request-wide tile cap: `max_tiles`, or vLLM's `mm_processor_kwargs.max_dynamic_patch`."""
    processor_kwargs = request.mm_processor_kwargs or {}
    for key in processor_kwargs:
        if key not in MM_PROCESSOR_KWARGS:
            raise _invalid(
                f"'mm_processor_kwargs.{key}' is not supported (supported: {', '.join(MM_PROCESSOR_KWARGS)}).",
                f"mm_processor_kwargs.{key}", code="unsupported_parameter",
            )
    patch = processor_kwargs.get("max_dynamic_patch")
    if patch is None:
        return request.max_tiles
    param = "mm_processor_kwargs.max_dynamic_patch"
    if type(patch) is not int or patch < 1:
        raise _invalid("'max_dynamic_patch' must be a positive integer.", param)
    if request.max_tiles is not None and request.max_tiles != patch:
        raise _invalid("'max_tiles' and 'mm_processor_kwargs.max_dynamic_patch' disagree; send one.", param)
    _check_tile_cap(patch, param, config)
    return patch


def _invalid(message: str, param: str, code: str = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, code=code, param=param)


def _check_unsupported_features(request: ChatCompletionRequest) -> None:
    for name, (is_noop, reason) in REFUSED_FEATURES.items():
        value = getattr(request, name)
        if value is not None and not is_noop(value):
            raise _invalid(f"'{name}' is not supported by this server: {reason}.", name, code="unsupported_parameter")
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
    if max_tokens is not None and request.min_tokens > max_tokens:
        raise _invalid(f"'min_tokens' ({request.min_tokens}) may not exceed '{given_field}' ({max_tokens}).",
                       "min_tokens")
    n = 1 if request.n is None else request.n
    if n > config.max_n:
        raise _invalid(f"'n' may be at most {config.max_n} on this server.", "n")
    stop = request.stop
    return SamplingConfig(
        n=n,
        max_tokens=max_tokens,
        max_tokens_param=given_field if max_tokens is not None else None,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        include_stop_str_in_output=request.include_stop_str_in_output,
        min_tokens=request.min_tokens,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        logit_bias=_logit_bias(request.logit_bias),
        allowed_token_ids=tuple(request.allowed_token_ids) if request.allowed_token_ids is not None else None,
        bad_words=tuple(request.bad_words or ()),
        ignore_eos=request.ignore_eos,
        skip_special_tokens=request.skip_special_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        response_format=_response_format(request.response_format),
        structured_outputs=request.structured_outputs,
    )


def _response_format(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The client's `response_format`, shape-checked here; vLLM checks the rest (schemas, structural tags)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise _invalid(f"'response_format.type' must be one of {', '.join(RESPONSE_FORMAT_TYPES)}.",
                       "response_format.type")
    if kind == "json_schema" and not isinstance(response_format.get("json_schema"), dict):
        raise _invalid("A 'json_schema' response format needs a 'json_schema' object.", "response_format.json_schema")
    return None if kind == "text" else response_format


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """Token-id keys as integers; whether they are in the vocabulary the engine checks (vLLM's own check)."""
    if not bias:
        return None
    converted: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise _invalid(f"'logit_bias' keys must be token ids; got {key[:32]!r}.", "logit_bias") from None
        if token_id < 0:
            raise _invalid(f"'logit_bias' token id {token_id} is outside the vocabulary.", "logit_bias")
        converted[token_id] = value
    return converted


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
    call_ids: set[str] = set()
    for message_index, message in enumerate(messages):
        param = f"messages[{message_index}].content"
        role = message.role
        _check_role_fields(message, f"messages[{message_index}]", call_ids)
        if message.content is None:
            if role not in _CONTENT_OPTIONAL_ROLES:
                raise _invalid(f"A {role} message needs 'content'.", param)
            parts: tuple[TextPart | ImagePart, ...] = ()
        elif isinstance(message.content, str):
            parts = (_text_part(message.content, param),)
        else:
            parts = tuple(
                _content_part(part, role, f"{param}[{part_index}]", config, request_max_tiles)
                for part_index, part in enumerate(message.content)
            )
        text_chars += sum(len(part.text) for part in parts if isinstance(part, TextPart))
        built.append(ChatMessage(
            role=role,
            parts=parts,
            name=message.name,
            tool_calls=tuple(call.model_dump() for call in message.tool_calls) if message.tool_calls else None,
            reasoning=message.reasoning if message.reasoning is not None else message.reasoning_content,
            tool_call_id=message.tool_call_id,
        ))
    if text_chars > config.max_text_chars:
        raise _invalid(
            f"The messages' text is too long (at most {config.max_text_chars} characters).", "messages",
            code="text_too_long",
        )
    return tuple(built)


_ASSISTANT_ONLY_FIELDS = ("refusal", "annotations", "audio", "function_call", "tool_calls", "reasoning",
                          "reasoning_content")


def _check_role_fields(message: ChatMessageIn, param: str, call_ids: set[str]) -> None:
    """Fields allowed by role; a tool message must answer a call made earlier (`call_ids`, updated here)."""
    if message.role == "tool":
        if message.tool_call_id is None:
            raise _invalid("A tool message needs 'tool_call_id'.", f"{param}.tool_call_id")
        if message.tool_call_id not in call_ids:
            raise _invalid(f"'tool_call_id' {message.tool_call_id[:64]!r} answers no earlier assistant tool call.",
                           f"{param}.tool_call_id")
    elif message.tool_call_id is not None:
        raise _invalid("'tool_call_id' is only allowed in tool messages.", f"{param}.tool_call_id")
    if message.role != "assistant":
        for name in _ASSISTANT_ONLY_FIELDS:
            if getattr(message, name) is not None:
                raise _invalid(f"'{name}' is only allowed in assistant messages.", f"{param}.{name}")
        return
    call_ids.update(call.id for call in message.tool_calls or ())
    if message.function_call is not None:
        raise _invalid("'function_call' is not supported: it is the deprecated form of 'tool_calls'.",
                       f"{param}.function_call", code="unsupported_parameter")
    if message.audio is not None:
        raise _invalid("'audio' is not supported: this server has no audio.", f"{param}.audio",
                       code="unsupported_parameter")


def _content_part(
    part: TextContentPart | ImageContentPart | RefusalContentPart,
    role: str,
    param: str,
    config: GatewayConfig,
    request_max_tiles: int | None,
) -> TextPart | ImagePart:
    if isinstance(part, RefusalContentPart):
        if role != "assistant":
            raise _invalid("Refusal parts are only allowed in assistant messages.", param)
        return _text_part(part.refusal, f"{param}.refusal")
    if not isinstance(part, ImageContentPart):
        return _text_part(part.text, f"{param}.text")
    if role != "user":
        raise _invalid("Images are only allowed in user messages.", param)
    spec = part.image_url
    image_param = f"{param}.image_url"
    if spec is None:
        if part.uuid is None:
            raise _invalid("An image part needs 'image_url', or the 'uuid' of an image sent before.", image_param)
        return ImagePart(url="", detail=config.default_detail, max_tiles=request_max_tiles, param=f"{param}.uuid",
                         uuid=part.uuid)
    check_image_reference(spec.url, image_param)
    _check_tile_cap(spec.max_tiles, f"{image_param}.max_tiles", config)
    return ImagePart(
        url=spec.url,
        detail=Detail(spec.detail) if spec.detail else config.default_detail,
        max_tiles=spec.max_tiles if spec.max_tiles is not None else request_max_tiles,
        param=image_param,
        uuid=part.uuid,
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
