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
    PromptTokensDetails,
    ToolCallOut,
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
class ChoiceResult:
    """What one choice (`index`) has produced so far."""

    text_pieces: list[str] = field(default_factory=list)
    reasoning_pieces: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)  # whole calls (non-streamed answers carry them at the end)
    content_null: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0
    last_token_at: float | None = None


@dataclass(slots=True)
class CompletionAccumulator:
    """What one request has produced so far, over all its choices, and when (perf_counter seconds)."""

    top_logprobs: int | None  # None: logprobs not requested
    n: int = 1
    choices: list[ChoiceResult] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_prompt_tokens: int | None = None
    completion_tokens: int = 0  # summed over the choices, as vLLM reports it
    timings: StageTimings | None = None  # the latest the pipeline reported
    first_content_at: float | None = None
    inter_token_s: list[float] = field(default_factory=list)  # per token after each choice's first: gap / tokens

    def __post_init__(self) -> None:
        self.choices = [ChoiceResult() for _ in range(self.n)]

    def add(self, delta: GenerationDelta, token_text: TokenText, now: float) -> list[TokenLogprob] | None:
        """Takes one delta in; returns its logprob entries (None when logprobs were not requested)."""
        if delta.prompt_token_count is not None and not self.prompt_tokens:
            self.prompt_tokens = delta.prompt_token_count
        if delta.cached_prompt_tokens is not None and self.cached_prompt_tokens is None:
            self.cached_prompt_tokens = delta.cached_prompt_tokens
        if delta.timings is not None:
            self.timings = delta.timings
        if (delta.text or delta.reasoning or delta.tool_calls) and self.first_content_at is None:
            self.first_content_at = now
        choice = self.choices[delta.index]
        choice.text_pieces.append(delta.text)
        if delta.reasoning:
            choice.reasoning_pieces.append(delta.reasoning)
        if delta.tool_calls:
            choice.tool_calls.extend(delta.tool_calls)
        choice.content_null = choice.content_null or delta.content_null
        self.completion_tokens += len(delta.token_ids)
        choice.tokens += len(delta.token_ids)
        if delta.token_ids:
            if choice.last_token_at is not None:
                per_token = (now - choice.last_token_at) / len(delta.token_ids)
                self.inter_token_s.extend([per_token] * len(delta.token_ids))
            choice.last_token_at = now
        choice.finish_reason = delta.finish_reason or choice.finish_reason
        if self.top_logprobs is None:
            return None
        entries = token_logprobs(delta, self.top_logprobs, token_text)
        choice.logprobs.extend(entries)
        return entries

    @property
    def usage(self) -> Usage:
        details = None if self.cached_prompt_tokens is None else PromptTokensDetails(
            cached_tokens=self.cached_prompt_tokens
        )
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details=details,
        )


    def choice_usage(self, index: int) -> Usage:
        """The usage so far of one choice (vLLM's `continuous_usage_stats` chunks report it per choice)."""
        tokens = self.choices[index].tokens
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=tokens, total_tokens=self.prompt_tokens + tokens)


def completion_response(
    request_id: str, model: str, created: int, result: CompletionAccumulator
) -> ChatCompletionResponse:
    choices = [
        Choice(
            index=index,
            message=_message(choice),
            logprobs=ChoiceLogprobs(content=choice.logprobs) if result.top_logprobs is not None else None,
            finish_reason=choice.finish_reason or "stop",
        )
        for index, choice in enumerate(result.choices)
    ]
    return ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=result.usage)


def _message(choice: ChoiceResult) -> AssistantMessage:
    """As vLLM: content null when the parser found none (tool calls or reasoning only); reasoning under both of its
    names."""
    content = "".join(choice.text_pieces)
    reasoning = "".join(choice.reasoning_pieces) or None
    calls = [ToolCallOut.model_validate(call) for call in choice.tool_calls] or None
    return AssistantMessage(content=None if choice.content_null and not content else content, tool_calls=calls,
                            reasoning=reasoning, reasoning_content=reasoning)


@dataclass(frozen=True, slots=True)
class ChunkFactory:
    """Builds the serialised chunks of one stream; every chunk carries `usage: null` when usage was asked for, or
    the usage so far with vLLM's `continuous_usage_stats`."""

    request_id: str
    model: str
    include_usage: bool
    continuous_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def _serialise(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                    usage=usage)
        return chunk.model_dump_json(exclude=None if self.include_usage else {"usage"})

    def role(self, index: int = 0, usage: Usage | None = None) -> str:
        return self._serialise([ChunkChoice(index=index, delta=ChunkDelta(role="assistant", content=""))],
                               self._running(usage))

    def content(self, text: str, logprobs: list[TokenLogprob] | None, index: int = 0,
                usage: Usage | None = None, reasoning: str = "", tool_calls: list[dict] | None = None) -> str:
        """A delta chunk; as vLLM, only the parts present appear (`content` stays when nothing else is there)."""
        choice_logprobs = ChoiceLogprobs(content=logprobs) if logprobs is not None else None
        delta = ChunkDelta(
            content=text if text or not (reasoning or tool_calls) else None,
            reasoning=reasoning or None,
            reasoning_content=reasoning or None,
            tool_calls=tool_calls or None,
        )
        return self._serialise([ChunkChoice(index=index, delta=delta, logprobs=choice_logprobs)],
                               self._running(usage))

    def finish(self, finish_reason: str, index: int = 0, usage: Usage | None = None) -> str:
        return self._serialise([ChunkChoice(index=index, delta=ChunkDelta(), finish_reason=finish_reason)],
                               self._running(usage))

    def usage(self, usage: Usage) -> str:
        return self._serialise([], usage=usage)

    def _running(self, usage: Usage | None) -> Usage | None:
        return usage if self.continuous_usage else None
