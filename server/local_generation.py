"""Generation when the images' embeddings are already in the process: the coupled baseline and text-only requests.

The prompt is rendered and streamed exactly as on a language replica (same `LanguageEngine.prepare`, same
`LanguageEngine.generate`), so the decoupled and coupled topologies differ only in where the embeddings come from.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Sequence

import torch

from dvd_serve.common.chat import ChatJob, GenerationDelta, StageTimings
from dvd_serve.lm_worker.engine import LanguageEngine
from dvd_serve.vision_worker.worker import VisionOutcome


async def generate_with_embeddings(
    engine: LanguageEngine, job: ChatJob, images: Sequence[torch.Tensor], vision_s: float = 0.0,
    image_ids: Sequence[str] | None = None,
) -> AsyncIterator[GenerationDelta]:
    """Stream the answer to `job` whose image placeholders are filled by `images` (each `[tokens, llm_hidden]`,
    named by `image_ids` for vLLM's prefix cache).

    The first delta carries queue time and visual-token totals, the final one all stage timings.
    """
    started = time.monotonic()
    prompt, plan = engine.prepare(job)
    timings = StageTimings(
        vision_s=vision_s,
        visual_tokens=sum(int(image.shape[0]) for image in images),
        embedding_bytes=sum(image.numel() * image.element_size() for image in images),
    )
    first_token_at: float | None = None
    async for delta in engine.generate(job.request_id, prompt, images, plan, job.priority, image_ids):
        now = time.monotonic()
        if first_token_at is None:
            first_token_at = now
            timings.queue_s = now - started
            delta.timings = dataclasses.replace(timings)
        if delta.ends_stream:
            # One delta can carry every token (vLLM coalesces outputs under load): then count from submission.
            timings.inference_s = now - (first_token_at if now > first_token_at else started)
            delta.timings = dataclasses.replace(timings)
        yield delta



def vision_seconds(outcome: VisionOutcome) -> float:
    """A request's vision time: fetch + decode + preprocess + batch wait + encode + transfer of all its images."""
    return (
        outcome.fetch_decode_s + outcome.preprocess_s + outcome.queue_wait_s + outcome.encode_s + outcome.transfer_s
    )
