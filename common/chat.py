"""The request and its streamed answer as they travel between gateway, vision and language services.

Plain, picklable-free data (frozen dataclasses and pydantic): the gateway builds a `ChatJob` from an OpenAI
request; the pipeline answers with `GenerationDelta`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

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
    """An image by reference: `https://...` / `http://...` (fetched by the vision service) or a `data:` URL."""

    url: str
    detail: Detail = Detail.AUTO
    max_tiles: int | None = None  # per-request cap on tiles (thumbnail excluded), None = checkpoint default
    param: str = ""  # request field it came from, e.g. "messages[1].content[0].image_url", for error messages


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    parts: tuple[TextPart | ImagePart, ...]


class SamplingConfig(FrozenConfig):
    """What the client asked for; validated by the gateway before it gets here."""

    max_tokens: int = Field(default=256, ge=1, description="Upper bound on generated tokens.")
    max_tokens_param: str | None = Field(
        default=None,
        description="Request field that set `max_tokens` (named in the error when prompt + max_tokens exceeds the "
        "context); None = a default, which the engine lowers to the room the prompt leaves instead.",
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Per-request sampling seed for reproducible sampling.")
    stop: tuple[str, ...] = Field(default=(), description="Strings that end generation (not included in output).")
    logprobs: int | None = Field(
        default=None, ge=0, le=20, description="Number of top log-probabilities per token; None for none."
    )
    ignore_eos: bool = Field(default=False, description="Keep generating past the end-of-sequence token.")


@dataclass(frozen=True, slots=True)
class ChatJob:
    """One chat completion request, ready for the pipeline."""

    request_id: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingConfig
    deadline_s: float | None = None  # seconds from submission after which the job is abandoned

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
    text: str
    finish_reason: str | None = None  # "stop" | "length" | None while running
    prompt_token_count: int | None = None  # set on the first delta; includes visual tokens
    logprobs: list[dict[int, float]] | None = None  # per new token: token id -> logprob (top-k + chosen)
    timings: StageTimings | None = field(default=None)  # set on the first and last delta
