"""Request and response bodies of the OpenAI-compatible API, field by field as in the OpenAI reference and vLLM's
own chat `ChatCompletionRequest` (vllm/entrypoints/openai/chat_completion/protocol.py).

Unknown-field policy (a request carrying any other field is a 400 with `param` naming it, as OpenAI answers):
- OpenAI fields and vLLM's extra fields dvd-serve implements are validated and honoured as vLLM honours them.
- OpenAI bookkeeping fields that change nothing in the answer (`user`, `metadata`, `store`, `service_tier`,
  `safety_identifier`, `prompt_cache_key`, `stream_options.include_obfuscation`, vLLM's `session_id`) are accepted
  and ignored, because common clients send them by default.
- Assistant messages accept every field the OpenAI SDK sends back (`refusal`, `annotations`, `audio`,
  `function_call`, `tool_calls`, vLLM's `reasoning` / `reasoning_content`); `audio` and the deprecated
  `function_call` are refused with a 400 that says why.
- OpenAI and vLLM features dvd-serve lacks are declared so they are recognised, and accepted only at the value
  meaning "not used"; any other value is a 400 saying why (see `job_builder.REFUSED_FEATURES`).
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
    image_url: ImageUrlSpec | None = Field(
        default=None, description="The image; may be null when `uuid` names an image this server was sent before."
    )
    uuid: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="vLLM's per-part media id: names these bytes so that a later part may send the `uuid` alone. "
        "It never replaces the content hash, so a reused uuid with new bytes gets the new image.",
    )


class RefusalContentPart(RequestModel):
    """An assistant message's refusal; read as text, as vLLM reads it (assistant messages only)."""

    type: Literal["refusal"]
    refusal: str


# Tags contain "-" so that error locations can drop them (they are never field names).
ContentPart = Annotated[
    Union[
        Annotated[TextContentPart, Tag("text-part")],
        Annotated[ImageContentPart, Tag("image-part")],
        Annotated[RefusalContentPart, Tag("refusal-part")],
    ],
    Discriminator(
        _tag_by_type({"text": "text-part", "image_url": "image-part", "refusal": "refusal-part"}),
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


class FunctionCallIn(RequestModel):
    name: str = Field(min_length=1)
    arguments: str = Field(description="The call's arguments as JSON text (an object), as the API returned them.")


class ToolCallIn(RequestModel):
    id: str = Field(min_length=1, description="Matched by the `tool_call_id` of the tool message answering it.")
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="`developer` becomes `system` when the chat template has no developer role (as in vLLM). "
        "Images are allowed in user messages only; a `tool` message answers an earlier assistant tool call."
    )
    content: MessageContent | None = Field(default=None, description="Required except in assistant messages.")
    name: str | None = Field(default=None, description="Passed to the chat template, as vLLM does.")
    tool_call_id: str | None = Field(default=None, description="Tool messages: the id of the call answered.")

    # --- assistant fields the OpenAI SDK sends back with `choices[i].message` ---
    refusal: str | None = Field(default=None, description="Accepted and not rendered (as in vLLM).")
    annotations: list[dict[str, Any]] | None = Field(default=None, description="Accepted and ignored.")
    audio: dict[str, Any] | None = Field(default=None, description="Only null: this server has no audio output.")
    function_call: dict[str, Any] | None = Field(
        default=None, description="Only null: the deprecated function-call form; use `tool_calls`."
    )
    tool_calls: list[ToolCallIn] | None = Field(default=None, description="The calls this assistant turn made.")
    reasoning: str | None = Field(default=None, description="vLLM: the turn's reasoning, given to the template.")
    reasoning_content: str | None = Field(default=None, description="Older name of `reasoning` (vLLM reads both).")


class StreamOptions(RequestModel):
    include_usage: StrictBool = Field(default=False, description="Send a last chunk with token usage.")
    continuous_usage_stats: StrictBool = Field(
        default=False, description="vLLM: with include_usage, every chunk carries the usage so far."
    )
    include_obfuscation: StrictBool | None = Field(default=None, description="Accepted and ignored.")




class FunctionDefinitionIn(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema of type object.")
    strict: StrictBool | None = None


class ToolIn(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinitionIn


class NamedFunctionIn(RequestModel):
    name: str


class NamedToolChoiceIn(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunctionIn


ToolChoice = Annotated[
    Union[
        Annotated[Literal["none", "auto", "required"], Tag("mode-choice")],
        Annotated[NamedToolChoiceIn, Tag("named-choice")],
    ],
    Discriminator(
        lambda value: "mode-choice" if isinstance(value, str) else "named-choice"
        if isinstance(value, (dict, NamedToolChoiceIn)) else None
    ),
]


class ChatCompletionRequest(RequestModel):
    # --- OpenAI fields dvd-serve implements ---
    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1, description="Deprecated alias of the next field.")
    max_completion_tokens: StrictInt | None = Field(
        default=None, ge=1, description="Absent = the rest of the context (as in vLLM)."
    )
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: StopSequences | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    n: StrictInt | None = Field(default=None, ge=1, description="Choices per request, at most the server's bound.")
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[StrictFloat, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="Token id (as a string) -> bias in [-100, 100]; ids must be in the vocabulary."
    )

    # --- OpenAI bookkeeping fields: accepted, no effect ---
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    # --- tools and reasoning, through vLLM's tool and reasoning parsers ---
    tools: list[ToolIn] | None = Field(default=None, description="Functions the model may call.")
    tool_choice: ToolChoice | None = Field(
        default=None, description="none, auto (the default with tools), required, or a named function."
    )
    parallel_tool_calls: StrictBool | None = Field(default=None, description="False: at most one call.")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        default=None, description="vLLM: sets the template's `enable_thinking` (none -> false, else true)."
    )
    include_reasoning: StrictBool = Field(default=True, description="vLLM: False drops the reasoning.")
    response_format: dict[str, Any] | None = None

    # --- OpenAI features dvd-serve lacks: accepted only at their "not used" value ---
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None

    # --- vLLM's extra sampling fields, honoured as vLLM honours them ---
    top_k: StrictInt | None = Field(default=None, ge=-1, description="vLLM: 0 or -1 = no top-k cut.")
    min_p: StrictFloat | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: StrictFloat | None = Field(default=None, gt=0.0)
    min_tokens: StrictInt = Field(default=0, ge=0, description="vLLM: tokens before EOS/stop ids may end.")
    stop_token_ids: list[StrictInt] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    include_stop_str_in_output: StrictBool = False
    ignore_eos: StrictBool = Field(default=False, description="vLLM: keep generating past end-of-sequence.")
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[str] | None = None

    # --- vLLM's extra request fields, honoured as vLLM honours them ---
    add_generation_prompt: StrictBool = Field(default=True, description="vLLM: open the assistant turn.")
    continue_final_message: StrictBool = Field(
        default=False, description="vLLM: continue the last (assistant) message instead of opening a new turn."
    )
    documents: list[dict[str, str]] | None = Field(default=None, description="vLLM: passed to the chat template.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="vLLM: extra variables for the checkpoint's chat template."
    )
    mm_processor_kwargs: dict[str, Any] | None = Field(
        default=None, description="vLLM: image processor options; `max_dynamic_patch` (most tiles) is supported."
    )
    request_id: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="vLLM: the response id becomes `chatcmpl-<request_id>` (the X-Request-Id header wins).",
    )
    priority: StrictInt = Field(
        default=0, ge=INT64_MIN, le=INT64_MAX,
        description="vLLM: lower is scheduled earlier; non-zero needs the priority scheduling policy.",
    )
    session_id: str | None = Field(default=None, description="vLLM bookkeeping: accepted and ignored.")

    # --- vLLM's extra fields dvd-serve lacks: accepted only at their "not used" value ---
    use_beam_search: Any = None
    length_penalty: Any = None
    watermarking: Any = None
    truncate_prompt_tokens: Any = None
    truncation_side: Any = None
    prompt_logprobs: Any = None
    logprob_token_ids: Any = None
    echo: Any = None
    add_special_tokens: Any = None
    chat_template: Any = None
    media_io_kwargs: Any = None
    return_tokens_as_token_ids: Any = None
    return_token_ids: Any = None
    routed_experts_prompt_start: Any = None
    return_token_offsets: Any = None
    return_prompt_text: Any = None
    mm_payload: Any = None
    return_mm_kwargs: Any = None
    cache_salt: Any = None
    kv_transfer_params: Any = None
    ec_transfer_params: Any = None
    vllm_xargs: Any = None
    repetition_detection: Any = None
    stream_interval: Any = None
    structured_outputs: dict[str, Any] | None = Field(
        default=None, description="vLLM: one constraint (json, regex, choice, grammar, ...) the output must meet."
    )
    thinking_token_budget: Any = None

    # --- dvd-serve extensions (not in the OpenAI API) ---
    max_tiles: StrictInt | None = Field(
        default=None, ge=1, description="dvd-serve: default tile cap for every image of the request."
    )


# ---- responses ----


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    """As vLLM answers: `tool_calls` only when there are some; `reasoning` (and its older name
    `reasoning_content`, which many clients read) only with a reasoning parser."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _without_empty_extras(self, handler) -> dict[str, Any]:
        data = handler(self)
        for key in ("tool_calls", "reasoning", "reasoning_content"):
            if not data.get(key):
                data.pop(key, None)
        return data


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
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's tool-call deltas: index, id, type, function pieces

    @model_serializer
    def _without_unset(self) -> dict[str, Any]:
        fields = (("role", self.role), ("content", self.content), ("reasoning", self.reasoning),
                  ("reasoning_content", self.reasoning_content), ("tool_calls", self.tool_calls))
        return {key: value for key, value in fields if value is not None}


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


# ---- /tokenize and /detokenize, as vLLM has them ----


class TokenizePromptRequest(RequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = Field(default=True, description="Add the tokenizer's special tokens.")
    return_token_strs: StrictBool | None = Field(default=None, description="Also return each token's text.")


class TokenizeChatRequest(RequestModel):
    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, str]] | None = None
    tools: list[ToolIn] | None = Field(default=None, description="Rendered into the prompt as for generation.")
    # vLLM fields dvd-serve refuses (see the chat request): a per-request template, media options.
    chat_template: Any = None
    media_io_kwargs: Any = None
    mm_processor_kwargs: Any = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
    vllm_version: str | None = None
