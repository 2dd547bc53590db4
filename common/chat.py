"""The request and its streamed answer as they travel between gateway, vision and language services.

Plain, picklable-free data (frozen dataclasses and pydantic): the gateway builds a `ChatJob` from an OpenAI
request; the pipeline answers with `GenerationDelta`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydantic import Field

from dvd_serve.common.config import FrozenConfig


class Detail(str, Enum):
    """`image_url.detail`: how many visual tokens an image may use."""

    AUTO = "auto"  # Flash: the router decides per tile; otherwise 256 tokens per tile
    HIGH = "high"  # every tile keeps 256 tokens
    LOW = "low"  # Flash: every tile 64 tokens; otherwise a single 448x448 thumbnail tile


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image by reference: `https://...` / `http://...` (fetched by the vision service) or a `data:` URL; or
    only by the client's `uuid` of an image sent before (then `url` is empty)."""

    url: str
    detail: Detail = Detail.AUTO
    max_tiles: int | None = None  # per-request cap on tiles (thumbnail excluded), None = checkpoint default
    param: str = ""  # request field it came from, e.g. "messages[1].content[0].image_url", for error messages
    uuid: str | None = None  # the content part's `uuid` (vLLM's): names these bytes for later parts without data


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "developer" | "user" | "assistant" | "tool"
    parts: tuple[TextPart | ImagePart, ...]
    name: str | None = None  # the message's `name`, passed to the chat template
    # Assistant history: the calls it made, OpenAI-shaped ({"id", "type": "function", "function": {"name",
    # "arguments": JSON text}}), and its reasoning (vLLM's `reasoning`, alias `reasoning_content`).
    tool_calls: tuple[dict[str, Any], ...] | None = None
    reasoning: str | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers


class SamplingConfig(FrozenConfig):
    """What the client asked for, validated by the gateway. None = not given: the language engine then applies the
    checkpoint's `generation_config.json` default, else vLLM's neutral default (as vLLM's own server does)."""

    n: int = Field(default=1, ge=1, description="Independent choices generated for the prompt.")
    max_tokens: int | None = Field(
        default=None, ge=1,
        description="Upper bound on generated tokens per choice; None = the rest of the context (bounded by the "
        "checkpoint's `max_new_tokens` default if it has one).",
    )
    max_tokens_param: str | None = Field(
        default=None,
        description="Request field that set `max_tokens` (named in the error when prompt + max_tokens exceeds the "
        "context).",
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int | None = Field(default=None, ge=-1, description="Most likely tokens kept; 0 or -1 = all.")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="Least probability relative to the top.")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Penalty on tokens seen.")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Penalty per occurrence.")
    repetition_penalty: float | None = Field(default=None, gt=0.0, description="Multiplicative repeat penalty.")
    seed: int | None = Field(default=None, description="Per-request sampling seed for reproducible sampling.")
    stop: tuple[str, ...] = Field(default=(), description="Strings that end generation.")
    stop_token_ids: tuple[int, ...] = Field(default=(), description="Token ids that end generation.")
    include_stop_str_in_output: bool = Field(default=False, description="Keep the matched stop string in the text.")
    min_tokens: int = Field(default=0, ge=0, description="Tokens generated before EOS or stop ids may end it.")
    logprobs: int | None = Field(
        default=None, ge=0, le=20, description="Number of top log-probabilities per token; None for none."
    )
    logit_bias: dict[int, float] | None = Field(
        default=None, description="Token id -> bias added to its logit, in [-100, 100]."
    )
    allowed_token_ids: tuple[int, ...] | None = Field(default=None, description="Only these tokens may be sampled.")
    bad_words: tuple[str, ...] = Field(default=(), description="Words that may not be generated.")
    ignore_eos: bool = Field(default=False, description="Keep generating past the end-of-sequence token.")
    skip_special_tokens: bool = Field(default=True, description="Leave special tokens out of the text.")
    spaces_between_special_tokens: bool = Field(
        default=True, description="Put spaces between special tokens in the text."
    )
    response_format: dict[str, Any] | None = Field(
        default=None,
        description="OpenAI's `response_format` as the client sent it (text, json_object, json_schema, or vLLM's "
        "structural_tag); vLLM's structured-output backend in the language engine enforces it.",
    )
    structured_outputs: dict[str, Any] | None = Field(
        default=None,
        description="vLLM's `structured_outputs` as the client sent it (one of json, regex, choice, grammar, "
        "json_object, structural_tag, with their options).",
    )


@dataclass(frozen=True, slots=True)
class PromptOptions:
    """How the chat template renders the prompt (vLLM's chat-template request fields)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: tuple[dict[str, str], ...] | None = None  # vLLM's `documents`, for templates that read them
    template_kwargs: tuple[tuple[str, object], ...] = ()  # `chat_template_kwargs`, as pairs


@dataclass(frozen=True, slots=True)
class AnswerOptions:
    """What the answer may contain besides text, and how it is split (by vLLM's tool and reasoning parsers)."""

    tools: tuple[dict[str, Any], ...] = ()  # OpenAI function tools, as the client sent them
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | a named function; None: default
    parallel_tool_calls: bool | None = None  # False: at most one call per answer
    include_reasoning: bool = True  # False: reasoning is parsed out and dropped
    reasoning_effort: str | None = None  # vLLM's mapping to the template's `enable_thinking`
    streamed: bool = True  # False: the whole answer is parsed once at the end, as vLLM does for non-streaming


@dataclass(frozen=True, slots=True)
class ChatJob:
    """One chat completion request, ready for the pipeline."""

    request_id: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingConfig
    deadline_s: float | None = None  # seconds from submission after which the job is abandoned
    prompt_options: PromptOptions = PromptOptions()
    priority: int = 0  # vLLM scheduling priority (lower is earlier); needs the engine's priority policy
    answer: AnswerOptions = AnswerOptions()

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(part for message in self.messages for part in message.parts if isinstance(part, ImagePart))


@dataclass(slots=True)
class StageTimings:
    """Where a request's time went, in seconds (reported in response headers and metrics)."""

    vision_s: float = 0.0  # fetch + decode + preprocess + encode + transfer of all images
    queue_s: float = 0.0  # waiting for a language replica / in the engine queue before the first token
    inference_s: float = 0.0  # first token to last token
    visual_tokens: int = 0
    embedding_bytes: int = 0


@dataclass(slots=True)
class GenerationDelta:
    """New output of one request since the previous delta."""

    token_ids: list[int]
    text: str  # the answer's content (with a parser: what is neither reasoning nor a tool call)
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | None while running
    index: int = 0  # the choice this delta belongs to (n > 1)
    choices_running: int = 0  # other choices of the request still generating after this delta
    prompt_token_count: int | None = None  # set on the first delta; includes visual tokens
    cached_prompt_tokens: int | None = None  # set on the first delta: prompt tokens served from the prefix cache
    logprobs: list[dict[int, float]] | None = None  # per new token: token id -> logprob (top-k + chosen)
    timings: StageTimings | None = field(default=None)  # set on the first and last delta
    reasoning: str = ""  # the reasoning parser's share of the new output
    # OpenAI-shaped tool-call pieces: streamed, {"index", "id"?, "type"?, "function": {"name"?, "arguments"?}};
    # not streamed, the whole calls on the last delta, {"id", "type", "function": {"name", "arguments"}}.
    tool_calls: list[dict[str, Any]] | None = None
    content_null: bool = False  # a non-streamed answer the parser left without content: `content` is null (vLLM's)
    made_at: float = 0.0  # wall-clock time (time.time()) the language engine produced it; 0 = unknown

    @property
    def ends_stream(self) -> bool:
        """True on the request's last delta: this choice finished and no other is still running."""
        return self.finish_reason is not None and self.choices_running == 0
