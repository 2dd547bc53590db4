"""The decoupled path gives the same greedy tokens as vLLM serving the same checkpoint monolithically.

Path under test (all real): data URL -> decode -> InternVL tiling -> InternViT + projector (VisionWorker) ->
gRPC client stream -> embedding sink + store (LanguageWorker) -> language-only vLLM AsyncLLM.
Reference: vLLM `LLM` on the same checkpoint and dtype, fed the PIL images (its own preprocessing and ViT).
"""

from __future__ import annotations

import asyncio

import pytest

from dvd_serve.common.chat import ChatJob, ChatMessage, ImagePart, SamplingConfig, TextPart
from dvd_serve.lm_worker.context_budget import prompt_token_count
from dvd_serve.lm_worker.engine import LanguageEngineConfig
from dvd_serve.lm_worker.worker import LanguageWorker, LanguageWorkerConfig
from dvd_serve.vision_worker.encoder import VisionEncoderConfig
from dvd_serve.vision_worker.worker import VisionWorker, VisionWorkerConfig
from tests.dvd_fixtures import SIZES_BY_TILES, data_url, monolithic_vllm_greedy, synthetic_image

pytestmark = pytest.mark.slow
MAX_TOKENS = 8

# Six single-image requests spanning 1..13 tiles, and multi-image requests mixing tile counts.
REQUESTS: list[tuple[int, ...]] = [(1,), (3,), (5,), (7,), (10,), (13,), (1, 5), (3, 7, 1)]


def _images():
    return {tiles: synthetic_image(*SIZES_BY_TILES[tiles], seed=tiles) for tiles in SIZES_BY_TILES}


def _job(request_id: str, tiles: tuple[int, ...], images) -> ChatJob:
    parts = tuple(ImagePart(url=data_url(images[t])) for t in tiles) + (TextPart("Describe the images."),)
    return ChatJob(
        request_id=request_id,
        messages=(ChatMessage("user", parts),),
        sampling=SamplingConfig(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
    )


async def _decoupled_tokens(model: str, jobs: list[ChatJob]) -> tuple[list[list[int]], list[str], list[list[int]]]:
    lm = await LanguageWorker.start(LanguageWorkerConfig(
        engine=LanguageEngineConfig(model=model, dtype="float32", max_model_len=8192)
    ), on_engine_death=lambda: None)
    vision = VisionWorker.load(VisionWorkerConfig(encoder=VisionEncoderConfig(model=model, dtype="float32")))
    try:
        prompts = [lm.engine.prepare(job)[0] for job in jobs]

        async def one(job: ChatJob, prompt: str) -> tuple[list[int], list[int]]:
            outcome_task = asyncio.create_task(vision.process(job.request_id, job.images, lm.grpc_address))
            tokens: list[int] = []
            engine_prompt_tokens: list[int] = []
            async for delta in lm.generate(job, expected_images=len(job.images)):
                tokens.extend(delta.token_ids)
                if delta.prompt_token_count is not None:
                    engine_prompt_tokens.append(delta.prompt_token_count)
            outcome = await outcome_task
            # The context budget is decided from our own count before the engine sees the request: it must be
            # vLLM's count exactly, images expanded.
            counted = prompt_token_count(lm.engine.tokenizer, prompt, lm.engine.spec, outcome.tokens_per_image)
            assert engine_prompt_tokens == [counted]
            return tokens, outcome.tokens_per_image

        results = await asyncio.gather(*(one(job, prompt) for job, prompt in zip(jobs, prompts, strict=True)))
        return [tokens for tokens, _ in results], prompts, [counts for _, counts in results]
    finally:
        await vision.close()
        await lm.stop()


@pytest.mark.parametrize("fixture_name", ["tiny_chat_checkpoint", "tiny_hf_checkpoint"])
def test_decoupled_greedy_tokens_equal_monolithic_vllm(fixture_name, request):
    model = str(request.getfixturevalue(fixture_name))
    images = _images()
    jobs = [_job(f"req-{i}", tiles, images) for i, tiles in enumerate(REQUESTS)]

    decoupled, prompts, tokens_per_image = asyncio.run(_decoupled_tokens(model, jobs))
    assert tokens_per_image == [[256 * t for t in tiles] for tiles in REQUESTS]

    reference = monolithic_vllm_greedy(
        model,
        [(prompt, [images[t] for t in tiles]) for prompt, tiles in zip(prompts, REQUESTS, strict=True)],
        trust_remote_code="chat" in fixture_name,
        max_tokens=MAX_TOKENS,
    )
    assert decoupled == reference
    # The comparison is only meaningful if the images steer the output.
    assert len({tuple(tokens) for tokens in reference}) > 1
