"""ViR in the serving path equals the published algorithm, and routing is per request.

1. Decisions and embeddings of the vision worker on a Flash checkpoint equal an independent reference: vLLM's
   original-format preprocessing, transformers' InternViT and projector, `tests/router_reference.py` for p0 and
   the decision rule, and a hand-written mlp2.
2. Greedy tokens through the decoupled path (vision worker -> gRPC -> language-only vLLM) equal a transformers-side
   reference that applies the same compression in float32 (visual rows scattered into the LLM's input embeddings).
3. A request gets the same decisions and embeddings alone and batched with concurrent requests.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from dvd_serve.common.chat import ChatJob, ChatMessage, Detail, ImagePart, SamplingConfig, TextPart
from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.checkpoint.weights import load_tensors
from dvd_serve.lm_worker.engine import LanguageEngineConfig
from dvd_serve.lm_worker.worker import LanguageWorker, LanguageWorkerConfig
from dvd_serve.vision_worker.encoder import VisionEncoderConfig
from dvd_serve.vision_worker.worker import VisionWorker, VisionWorkerConfig
from tests.dvd_fixtures import SIZES_BY_TILES, data_url, synthetic_image
from tests.router_reference import reference_decisions, reference_p0

# Thresholds that compress roughly two thirds of the tiles of a request.
RELATIVE, ABSOLUTE = 0.33, 0.0
MAX_TOKENS = 8
REQUESTS: list[tuple[int, ...]] = [(1,), (5,), (13,), (3, 7), (1, 5, 3)]
# 22 images in 10 requests for the vision-side parity (no language engine involved, so this stays cheap).
VISION_REQUESTS: list[tuple[int, ...]] = REQUESTS + [(10,), (7, 7), (13, 1), (3, 5, 10, 1), (5, 3)]


def _vision_config(model) -> VisionWorkerConfig:
    return VisionWorkerConfig(encoder=VisionEncoderConfig(
        model=str(model), dtype="float32", router_relative_threshold=RELATIVE, router_absolute_threshold=ABSOLUTE,
    ))


def _images(seed: int = 100):
    return {tiles: synthetic_image(*SIZES_BY_TILES[tiles], seed=seed + tiles) for tiles in SIZES_BY_TILES}


class TransformersFlashReference:
    """The published Flash forward, assembled from transformers modules and test-side reference code, in fp32."""

    def __init__(self, hf_checkpoint, flash_checkpoint) -> None:
        from transformers import AutoTokenizer, InternVLForConditionalGeneration
        from vllm.transformers_utils.processors.internvl import InternVLImageProcessor

        # The tiny hf and Flash checkpoints share their seed, hence their ViT, mlp1 and LLM weights.
        self.model = InternVLForConditionalGeneration.from_pretrained(hf_checkpoint, torch_dtype=torch.float32).eval()
        self.flash = load_tensors(flash_checkpoint, ("mlp2.", "pooling_before_gating.", "gating."))
        self.tokenizer = AutoTokenizer.from_pretrained(flash_checkpoint)
        self.spec = CheckpointSpec.from_dir(flash_checkpoint)
        self.processor = InternVLImageProcessor(
            image_size=448, min_dynamic_patch=1, max_dynamic_patch=12, dynamic_image_size=True, use_thumbnail=True
        )

    def _mlp2(self, x: torch.Tensor) -> torch.Tensor:
        w = self.flash
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], w["mlp2.0.weight"], w["mlp2.0.bias"])
        x = torch.nn.functional.gelu(x @ w["mlp2.1.weight"].T + w["mlp2.1.bias"])
        x = torch.nn.functional.gelu(x @ w["mlp2.4.weight"].T + w["mlp2.4.bias"])
        return x @ w["mlp2.7.weight"].T + w["mlp2.7.bias"]

    @torch.inference_mode()
    def encode(self, images) -> tuple[list[torch.Tensor], list[list[bool]]]:
        """One request's images -> per image embeddings [tokens, llm] and per-tile compress flags."""
        batch = self.processor(list(images))
        pixels = batch["pixel_values_flat"]
        counts = batch["image_num_patches"].tolist()
        inner = self.model.model
        features = inner.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:, :]  # [tiles, 1024, vit]
        flags = reference_decisions(reference_p0(self.flash, features).tolist(), RELATIVE, ABSOLUTE)
        side = int(features.shape[1] ** 0.5)
        grid = features.reshape(features.shape[0], side, side, -1)
        full = inner.multi_modal_projector(inner.pixel_shuffle(grid, 0.5).reshape(grid.shape[0], -1, grid.shape[-1] * 4))
        small = self._mlp2(inner.pixel_shuffle(grid, 0.25).reshape(grid.shape[0], -1, grid.shape[-1] * 16))
        rows = [small[t] if flags[t] else full[t] for t in range(features.shape[0])]
        per_image, per_flags, start = [], [], 0
        for count in counts:
            per_image.append(torch.cat(rows[start:start + count]))
            per_flags.append(flags[start:start + count])
            start += count
        return per_image, per_flags

    @torch.inference_mode()
    def greedy(self, prompt: str, embeddings: list[torch.Tensor], max_tokens: int) -> list[int]:
        spec = self.spec
        for image in embeddings:  # vLLM's expansion of each placeholder
            expanded = spec.image_start_token + spec.image_context_token * image.shape[0] + spec.image_end_token
            prompt = prompt.replace(spec.image_placeholder, expanded, 1)
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        context_id = self.tokenizer.convert_tokens_to_ids(spec.image_context_token)
        embed = self.model.get_input_embeddings()
        inputs = embed(ids)
        inputs[ids == context_id] = torch.cat(embeddings)
        generated: list[int] = []
        for _ in range(max_tokens):
            logits = self.model(inputs_embeds=inputs).logits[0, -1]
            token = int(logits.argmax())
            generated.append(token)
            inputs = torch.cat([inputs, embed(torch.tensor([[token]]))], dim=1)
        return generated


@pytest.fixture(scope="module")
def reference(tiny_hf_checkpoint, tiny_flash_checkpoint):
    return TransformersFlashReference(tiny_hf_checkpoint, tiny_flash_checkpoint)


def _parts(tiles: tuple[int, ...], images, detail=Detail.AUTO):
    return tuple(ImagePart(url=data_url(images[t]), detail=detail) for t in tiles)


def test_vision_worker_matches_the_published_router_and_projectors(tiny_flash_checkpoint, reference):
    # Each request draws its images from its own seed, so the 22 images all differ.
    request_images = [_images(seed=1000 * (index + 1)) for index in range(len(VISION_REQUESTS))]

    async def run():
        worker = VisionWorker.load(_vision_config(tiny_flash_checkpoint))
        try:
            return [
                await worker.encode(_parts(tiles, images))
                for tiles, images in zip(VISION_REQUESTS, request_images, strict=True)
            ]
        finally:
            await worker.close()

    ours = asyncio.run(run())
    compressed = total = 0
    for tiles, images, encoded in zip(VISION_REQUESTS, request_images, ours, strict=True):
        expected, flags = reference.encode([images[t] for t in tiles])
        assert [list(image.tokens_per_tile) for image in encoded] == [[64 if f else 256 for f in fl] for fl in flags]
        for image, want in zip(encoded, expected, strict=True):
            assert (image.embeddings - want).abs().max().item() <= 1e-5
        compressed += sum(sum(fl) for fl in flags)
        total += sum(len(fl) for fl in flags)
    assert 0 < compressed < total  # the rule really chose, both ways


def test_same_decisions_alone_and_under_concurrent_load(tiny_flash_checkpoint):
    images = _images()
    probe = _parts((3, 7), images)
    others = [_parts((t,), images) for t in (13, 5, 10, 1)]

    async def run():
        worker = VisionWorker.load(_vision_config(tiny_flash_checkpoint))
        try:
            alone = await worker.encode(probe)
            together = await asyncio.gather(worker.encode(probe), *(worker.encode(parts) for parts in others))
            return alone, together[0]
        finally:
            await worker.close()

    alone, loaded = asyncio.run(run())
    assert [image.tokens_per_tile for image in alone] == [image.tokens_per_tile for image in loaded]
    for a, b in zip(alone, loaded, strict=True):
        assert (a.embeddings - b.embeddings).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_decoupled_flash_greedy_tokens_equal_transformers_reference(tiny_flash_checkpoint, reference):
    images = _images()
    model = str(tiny_flash_checkpoint)

    async def run():
        lm = await LanguageWorker.start(LanguageWorkerConfig(
            engine=LanguageEngineConfig(model=model, dtype="float32", max_model_len=8192)
        ), on_engine_death=lambda: None)
        vision = VisionWorker.load(_vision_config(model))
        results = []
        try:
            for index, tiles in enumerate(REQUESTS):
                job = ChatJob(
                    request_id=f"flash-{index}",
                    messages=(ChatMessage("user", _parts(tiles, images) + (TextPart("What is shown?"),)),),
                    sampling=SamplingConfig(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
                )
                prompt = lm.engine.prepare(job)[0]
                push = asyncio.create_task(vision.process(job.request_id, job.images, lm.grpc_address))
                tokens = [t async for delta in lm.generate(job, len(job.images)) for t in delta.token_ids]
                await push
                results.append((prompt, tokens))
        finally:
            await vision.close()
            await lm.stop()
        return results

    decoupled = asyncio.run(run())
    for (prompt, tokens), tiles in zip(decoupled, REQUESTS, strict=True):
        embeddings, _ = reference.encode([images[t] for t in tiles])
        assert tokens == reference.greedy(prompt, embeddings, MAX_TOKENS)
