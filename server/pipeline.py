"""What the gateway needs from the serving pipeline (implemented by the Ray orchestration, doubled in tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from dvd_serve.common.chat import ChatJob, GenerationDelta


class ChatPipeline(Protocol):
    """Runs chat jobs through vision and language replicas.

    `generate` raises `dvd_serve.common.errors.ServingError` subclasses for expected failures, either before
    the first delta (the gateway answers with that status) or mid-stream (the gateway sends an error event).
    Cancelling the iteration (client gone) must abort vision and language work for the job.
    """

    @property
    def model_id(self) -> str:
        """Name served under `/v1/models` and echoed in responses."""
        ...

    @property
    def max_model_len(self) -> int:
        """Context length of the language model, for early 400s on oversized requests."""
        ...

    def generate(self, job: ChatJob) -> AsyncIterator[GenerationDelta]:
        """Stream the answer to `job`. The first delta carries `prompt_token_count` and timings."""
        ...

    async def readiness(self) -> dict[str, bool]:
        """Pool name -> whether it has at least one live replica (`/ready` is 200 only if all are True)."""
        ...

    def token_text(self, token_id: int) -> str:
        """Text of one token id (for logprobs)."""
        ...

    def engines_alive(self) -> bool:
        """False when no live language engine is left in a pool (`/health` then fails, as vLLM's does)."""
        ...

    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]:
        """`/tokenize` of a plain prompt."""
        ...

    def detokenize(self, token_ids: list[int]) -> str:
        """`/detokenize`."""
        ...

    async def tokenize_chat(self, job: ChatJob) -> list[int]:
        """`/tokenize` of a text-only chat: its prompt token ids, rendered exactly as for generation."""
        ...
