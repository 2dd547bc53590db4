"""Pipeline deltas -> OpenAI `chat.completion` objects and `chat.completion.chunk` objects."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dvd_serve.common.chat import GenerationDelta, StageTimings
from dvd_serve.server.api.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
)

# OpenAI reports this instead of -inf (JSON has no infinity).
LOWEST_LOGPROB = -9999.0

TokenText = Callable[[int], str]


def token_logprobs(delta: GenerationDelta, top_n: int, token_text: TokenText) -> list[TokenLogprob]:
    """OpenAI `logprobs.content` entries for the tokens of one delta."""
    entries: list[TokenLogprob] = []
    for token_id, candidates in zip(delta.token_ids, delta.logprobs or (), strict=False):
        ranked = sorted(candidates.items(), key=lambda item: item[1], reverse=True)[:top_n]
        chosen_text = token_text(token_id)
        entries.append(
            TokenLogprob(
                token=chosen_text,
                logprob=max(candidates.get(token_id, LOWEST_LOGPROB), LOWEST_LOGPROB),
                bytes=list(chosen_text.encode("utf-8", errors="replace")),
                top_logprobs=[_top_logprob(candidate, logprob, token_text) for candidate, logprob in ranked],
            )
        )
    return entries


def _top_logprob(token_id: int, logprob: float, token_text: TokenText) -> TopLogprob:
    text = token_text(token_id)
    return TopLogprob(token=text, logprob=max(logprob, LOWEST_LOGPROB), bytes=list(text.encode("utf-8", "replace")))


@dataclass(slots=True)
class CompletionAccumulator:
    """What one request has produced so far, and when (perf_counter seconds)."""

    top_logprobs: int | None  # None: logprobs not requested
    text_pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    timings: StageTimings | None = None  # the latest the pipeline reported
    first_content_at: float | None = None

    def add(self, delta: GenerationDelta, token_text: TokenText, now: float) -> list[TokenLogprob] | None:
        """Takes one delta in; returns its logprob entries (None when logprobs were not requested)."""
        if delta.prompt_token_count is not None and not self.prompt_tokens:
            self.prompt_tokens = delta.prompt_token_count
        if delta.timings is not None:
            self.timings = delta.timings
        if delta.text and self.first_content_at is None:
            self.first_content_at = now
        self.text_pieces.append(delta.text)
        self.completion_tokens += len(delta.token_ids)
        self.finish_reason = delta.finish_reason or self.finish_reason
        if self.top_logprobs is None:
            return None
        entries = token_logprobs(delta, self.top_logprobs, token_text)
        self.logprobs.extend(entries)
        return entries

    @property
    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


def completion_response(
    request_id: str, model: str, created: int, result: CompletionAccumulator
) -> ChatCompletionResponse:
    logprobs = ChoiceLogprobs(content=result.logprobs) if result.top_logprobs is not None else None
    choice = Choice(
        message=AssistantMessage(content="".join(result.text_pieces)),
        logprobs=logprobs,
        finish_reason=result.finish_reason or "stop",
    )
    return ChatCompletionResponse(id=request_id, created=created, model=model, choices=[choice], usage=result.usage)


@dataclass(frozen=True, slots=True)
class ChunkFactory:
    """Builds the serialised chunks of one stream; every chunk carries `usage: null` when usage was asked for."""

    request_id: str
    model: str
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def _serialise(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                    usage=usage)
        return chunk.model_dump_json(exclude=None if self.include_usage else {"usage"})

    def role(self) -> str:
        return self._serialise([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])

    def content(self, text: str, logprobs: list[TokenLogprob] | None) -> str:
        choice_logprobs = ChoiceLogprobs(content=logprobs) if logprobs is not None else None
        return self._serialise([ChunkChoice(delta=ChunkDelta(content=text), logprobs=choice_logprobs)])

    def finish(self, finish_reason: str) -> str:
        return self._serialise([ChunkChoice(delta=ChunkDelta(), finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> str:
        return self._serialise([], usage=usage)
