"""Test doubles of `dvd_serve.server.pipeline.ChatPipeline` for gateway tests (never used by product code)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from dvd_serve.common.chat import ChatJob, GenerationDelta, StageTimings

HANG = object()  # script item: the double waits forever at this point (until cancelled)

FIRST_TIMINGS = StageTimings(vision_s=0.125, queue_s=0.0375, inference_s=0.0, visual_tokens=512, embedding_bytes=4096)
LAST_TIMINGS = StageTimings(vision_s=0.125, queue_s=0.0375, inference_s=0.25, visual_tokens=512, embedding_bytes=4096)


def scripted_answer(
    token_ids: Sequence[int] = (11, 12, 13),
    prompt_token_count: int = 530,
    finish_reason: str = "stop",
    with_logprobs: bool = False,
) -> list[GenerationDelta]:
    """One delta per token, text `t<id>`; the first carries the prompt size and timings, the last final timings.

    With logprobs, each token's candidates are the chosen token at -0.5 and `id + 100` at -1.5.
    """
    deltas = []
    for index, token_id in enumerate(token_ids):
        last = index == len(token_ids) - 1
        deltas.append(
            GenerationDelta(
                token_ids=[token_id],
                text=f"t{token_id}",
                finish_reason=finish_reason if last else None,
                prompt_token_count=prompt_token_count if index == 0 else None,
                logprobs=[{token_id: -0.5, token_id + 100: -1.5}] if with_logprobs else None,
                timings=FIRST_TIMINGS if index == 0 else (LAST_TIMINGS if last else None),
            )
        )
    return deltas


@dataclass
class ScriptedPipelineDouble:
    """Plays `script` for every job: deltas are yielded, exceptions raised, `HANG` waits until cancelled.

    Records the jobs it was given and, per request id, whether the iteration was closed before its final delta
    (`aborted`, which is how the gateway cancels vision and language work) or after it (`finished`).
    """

    script: list[object] = field(default_factory=scripted_answer)
    model_id: str = "internvl-double"
    max_model_len: int = 4096
    pools: dict[str, bool] = field(default_factory=lambda: {"vision": True, "language": True})
    readiness_error: Exception | None = None
    engines_are_alive: bool = True
    jobs: list[ChatJob] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def generate(self, job: ChatJob) -> AsyncIterator[GenerationDelta]:
        self.jobs.append(job)
        return self._play(job)

    async def _play(self, job: ChatJob) -> AsyncIterator[GenerationDelta]:
        self.started.set()
        completed = False
        try:
            for item in self.script:
                if item is HANG:
                    await asyncio.Event().wait()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, GenerationDelta) and item.ends_stream:
                    completed = True  # the answer is complete once its final delta is handed over
                yield item
        finally:
            (self.finished if completed else self.aborted).append(job.request_id)

    async def readiness(self) -> dict[str, bool]:
        if self.readiness_error is not None:
            raise self.readiness_error
        return dict(self.pools)

    def token_text(self, token_id: int) -> str:
        return f"t{token_id}"

    def engines_alive(self) -> bool:
        return self.engines_are_alive

    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]:
        """One token per character (its code point), plus 1 in front with special tokens."""
        return ([1] if add_special_tokens else []) + [ord(character) for character in text]

    def detokenize(self, token_ids: list[int]) -> str:
        return "".join(chr(token_id) for token_id in token_ids)

    async def tokenize_chat(self, job: ChatJob) -> list[int]:
        self.jobs.append(job)
        text = "|".join(f"{message.role}:{part.text}" for message in job.messages for part in message.parts)
        return self.tokenize_text(text, add_special_tokens=False)
