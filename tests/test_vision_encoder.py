"""The vision encoder equals transformers' InternVL image features, from either checkpoint format."""

from __future__ import annotations

import pytest
import torch

from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.checkpoint import weights as checkpoint_weights
from dvd_serve.vision_worker.encoder import VisionEncoder, VisionEncoderConfig
from dvd_serve.vision_worker.projector import pixel_shuffle


def _random_tiles(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 448, 448, generator=generator)


@pytest.fixture(scope="module")
def hf_reference(tiny_hf_checkpoint):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_hf_checkpoint, torch_dtype=torch.float32)
    return model.eval()


def _encoder(path) -> VisionEncoder:
    return VisionEncoder.from_config(VisionEncoderConfig(model=str(path), dtype="float32", device="cpu"))


def test_hf_format_matches_transformers_image_features(tiny_hf_checkpoint, hf_reference):
    tiles = _random_tiles(5, seed=0)
    with torch.inference_mode():
        expected = hf_reference.model.get_image_features(
            pixel_values=tiles,
            vision_feature_layer=hf_reference.config.vision_feature_layer,
            vision_feature_select_strategy=hf_reference.config.vision_feature_select_strategy,
        ).pooler_output  # [tiles, 256, llm]
    encoded = _encoder(tiny_hf_checkpoint).encode([tiles[:1], tiles[1:]])
    assert [image.tokens_per_tile for image in encoded] == [(256,), (256,) * 4]
    ours = torch.cat([image.embeddings for image in encoded])
    assert ours.shape == (5 * 256, expected.shape[-1])
    assert (ours - expected.reshape(-1, expected.shape[-1])).abs().max().item() <= 1e-5


def test_chat_format_gives_the_same_numbers(tiny_hf_checkpoint, tiny_chat_checkpoint):
    tiles = _random_tiles(3, seed=1)
    from_hf = _encoder(tiny_hf_checkpoint).encode([tiles])[0].embeddings
    from_chat = _encoder(tiny_chat_checkpoint).encode([tiles])[0].embeddings
    assert (from_hf - from_chat).abs().max().item() <= 1e-5


def test_batching_does_not_change_an_image(tiny_chat_checkpoint):
    encoder = _encoder(tiny_chat_checkpoint)
    tiles = _random_tiles(4, seed=2)
    alone = encoder.encode([tiles[:2]])[0].embeddings
    batched = encoder.encode([tiles[2:], tiles[:2]])[1].embeddings
    assert (alone - batched).abs().max().item() <= 1e-5


def test_language_model_weights_are_never_read(tiny_chat_checkpoint, monkeypatch):
    requested: list[str] = []
    real_load = checkpoint_weights.load_tensors

    def recording_load(path, prefixes, **kwargs):
        requested.extend(prefixes)
        tensors = real_load(path, prefixes, **kwargs)
        requested.extend(tensors)
        return tensors

    monkeypatch.setattr("dvd_serve.vision_worker.vision_weights.load_tensors", recording_load)
    _encoder(tiny_chat_checkpoint)
    assert requested and not [name for name in requested if "language_model" in name or "lm_head" in name]


def test_flash_checkpoint_projects_64_token_tiles_with_mlp2(tiny_flash_checkpoint):
    encoder = _encoder(tiny_flash_checkpoint)
    tiles = _random_tiles(3, seed=3)
    compress = torch.tensor([False, True, False])
    (image,) = encoder.encode([tiles], compress=[compress])
    assert image.tokens_per_tile == (256, 64, 256)
    features = encoder.vit_features(tiles)
    side = int(features.shape[1] ** 0.5)
    grid = features[1:2].reshape(1, side, side, -1)
    expected_small = encoder.mlp2(pixel_shuffle(grid, 0.25).reshape(1, -1, grid.shape[-1] * 16))[0]
    assert (image.embeddings[256:320] - expected_small).abs().max().item() <= 1e-6


def test_spec_reports_the_vision_dimensions(tiny_flash_checkpoint):
    spec = CheckpointSpec.from_dir(tiny_flash_checkpoint)
    assert spec.flash and spec.vit_hidden == 64 and spec.tokens_per_tile == 256
