"""Reads an OpenAI chat completion event stream as bytes arrive, noting when the first output came.

First output = the first chunk with non-empty `content`, or with `logprobs` entries. Servers send logprobs with
every token when the request asks for them, also for tokens that are not text yet (part of a UTF-8 character, or
ids a random-weight model picks outside its small tokenizer); so a request with logprobs times its first token
even when its text stays empty, and a request without them times its first non-empty content.

Pure and clock-free: the caller passes the time each network chunk arrived, so tests can feed synthetic streams.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

DONE = "[DONE]"


@dataclass(slots=True)
class StreamOutcome:
    """What one stream carried, with times in the caller's clock."""

    first_output_at: float | None = None
    content_chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None  # message of an in-stream error event, or why the stream is malformed
    done: bool = False  # `data: [DONE]` seen
    logprob_tokens: list[str] = field(default_factory=list)  # chosen tokens, when the request asked for logprobs
    text: str = ""


class ChatStreamReader:
    """Feed it raw body chunks in order; `outcome` holds what was seen so far."""

    def __init__(self) -> None:
        self.outcome = StreamOutcome()
        self._pending = b""

    def feed(self, chunk: bytes, arrived_at: float) -> None:
        self._pending += chunk.replace(b"\r\n", b"\n")
        *events, self._pending = self._pending.split(b"\n\n")
        for event in events:
            self._event(event, arrived_at)

    def _event(self, event: bytes, arrived_at: float) -> None:
        data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data or self.outcome.done:
            return
        if data == DONE.encode():
            self.outcome.done = True
            return
        try:
            document = json.loads(data)
        except json.JSONDecodeError:
            self.outcome.error = "malformed event: " + data[:200].decode("utf-8", "replace")
            return
        if "error" in document:
            error = document["error"]
            self.outcome.error = str(error.get("message", error) if isinstance(error, dict) else error)
            return
        usage = document.get("usage")
        if usage:
            self.outcome.prompt_tokens = usage.get("prompt_tokens")
            self.outcome.completion_tokens = usage.get("completion_tokens")
        for choice in document.get("choices") or ():
            self._choice(choice, arrived_at)

    def _choice(self, choice: dict, arrived_at: float) -> None:
        content = (choice.get("delta") or {}).get("content")
        if content:
            self.outcome.content_chunks += 1
            self.outcome.text += content
        entries = (choice.get("logprobs") or {}).get("content") or ()
        self.outcome.logprob_tokens.extend(entry["token"] for entry in entries)
        if (content or entries) and self.outcome.first_output_at is None:
            self.outcome.first_output_at = arrived_at
