"""Request and response bodies of the OpenAI-compatible API, field by field as in the OpenAI reference.

Unknown-field policy (a request carrying any other field is a 400 with `param` naming it):
- OpenAI fields dvd-serve implements are validated and used.
- OpenAI bookkeeping fields that change nothing in the answer (`user`, `metadata`, `store`, `service_tier`,
  `safety_identifier`, `prompt_cache_key`, `parallel_tool_calls`, `name` on messages,
  `stream_options.include_obfuscation`) are accepted and ignored, because common clients send them by default.
- OpenAI features dvd-serve lacks (`frequency_penalty`, `presence_penalty`, `logit_bias`, `tools`, `tool_choice`,
  `functions`, `function_call`, `response_format`, `modalities`, `reasoning_effort`) are accepted only at the value
  meaning "not used"; any other value is a 400 (see `job_builder.UNSUPPORTED_FEATURE_NOOPS`).
- dvd-serve's own fields sit in a marked block below.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tag,
    model_serializer,
)

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class RequestModel(BaseModel):
    """Strict request body: unknown keys and NaN/Infinity are validation errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())


def _tag_by_type(tags: dict[str, str]):
    """Discriminator for a union of models told apart by their `type` value."""

    def choose(value: Any) -> str | None:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        return tags.get(kind) if isinstance(kind, str) else None

    return choose


def _tag_str_or_list(single: str, many: str):
    """Discriminator for `str | list[...]` fields, so a validation error names one branch only."""

    def choose(value: Any) -> str | None:
        if isinstance(value, str):
            return single
        return many if isinstance(value, list) else None

    return choose


class ImageUrlSpec(RequestModel):
    url: str = Field(description="`https://...`, `http://...` or `data:image/<format>;base64,<data>`.")
    detail: Literal["auto", "low", "high"] | None = Field(
        default=None, description="Visual token budget: low, high, or auto (the router decides on Flash models)."
    )
    # --- dvd-serve extension (not in the OpenAI API) ---
    max_tiles: StrictInt | None = Field(
        default=None, ge=1, description="dvd-serve: most 448x448 tiles for this image (thumbnail excluded)."
    )


class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str


class ImageContentPart(RequestModel):
    type: Literal["image_url"]
    image_url: ImageUrlSpec


# Tags contain "-" so that error locations can drop them (they are never field names).
ContentPart = Annotated[
    Union[Annotated[TextContentPart, Tag("text-part")], Annotated[ImageContentPart, Tag("image-part")]],
    Discriminator(
        _tag_by_type({"text": "text-part", "image_url": "image-part"}),
        custom_error_type="unsupported_content_part",
        custom_error_message="Unsupported content part type.",
    ),
]

MessageContent = Annotated[
    Union[
        Annotated[str, Tag("string-content")],
        Annotated[Annotated[list[ContentPart], Field(min_length=1)], Tag("part-list-content")],
    ],
    Discriminator(_tag_str_or_list("string-content", "part-list-content")),
]

StopSequences = Annotated[
    Union[
        Annotated[Annotated[str, Field(min_length=1)], Tag("one-stop")],
        Annotated[
            Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)],
            Tag("stop-list"),
        ],
    ],
    Discriminator(_tag_str_or_list("one-stop", "stop-list")),
]


class ChatMessageIn(RequestModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` is treated as `system`. Images are allowed in user messages only."
    )
    content: MessageContent
    name: str | None = Field(default=None, description="Accepted and ignored.")


class StreamOptions(RequestModel):
    include_usage: StrictBool = Field(default=False, description="Send a last chunk with token usage.")
    include_obfuscation: StrictBool | None = Field(default=None, description="Accepted and ignored.")


class ChatCompletionRequest(RequestModel):
    # --- OpenAI fields dvd-serve implements ---
    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1, description="Deprecated alias of the next field.")
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: StopSequences | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    n: StrictInt | None = Field(default=None, description="Only 1 is supported.")

    # --- OpenAI bookkeeping fields: accepted, no effect ---
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: StrictBool | None = None

    # --- OpenAI features dvd-serve lacks: accepted only at their "not used" value ---
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    logit_bias: dict[str, StrictFloat] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None

    # --- dvd-serve extensions (not in the OpenAI API) ---
    max_tiles: StrictInt | None = Field(
        default=None, ge=1, description="dvd-serve: default tile cap for every image of the request."
    )
    ignore_eos: StrictBool = Field(default=False, description="dvd-serve: keep generating past end-of-sequence.")


# ---- responses ----


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _without_unset(self) -> dict[str, str]:
        return {key: value for key, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dvd-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
