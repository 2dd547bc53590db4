"""Our tiling and preprocessing against vLLM's, for both checkpoint formats.

References (the same callables the benchmark times):
- chat: vLLM's `InternVLImageProcessor` (model card algorithm, Pillow bicubic, ToTensor + Normalize);
- hf: the processor `AutoImageProcessor` resolves for an InternVL3.5-HF `preprocessor_config.json` (torchvision
  `GotOcr2ImageProcessor`), called per image as vLLM's interns1 path does.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dvd_serve.common.torch_compat import ensure_torchvision_importable

ensure_torchvision_importable()

from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas  # noqa: E402
from vllm.transformers_utils.processors.internvl import (  # noqa: E402
    calculate_internvl_targets,
    get_internvl_target_ratios,
)

from dvd_serve.loadtests.benchmarks.preprocess import vllm_chat_reference, vllm_hf_reference  # noqa: E402
from dvd_serve.vision_worker.preprocess import ImagePreprocessor, PreprocessConfig  # noqa: E402
from dvd_serve.vision_worker.tiling import (  # noqa: E402
    candidate_grids,
    choose_grid,
    tile_boxes,
    tile_count,
)

TILE = 448
MAX_ABS_DIFF = 1e-5
# (width, height): degenerate, tiny, square multiples of the tile, common photo shapes, extreme aspect ratios,
# off-by-one sizes around the tile, and a 5:2 shape that hits the tie-break rule.
PARITY_SIZES = (
    (1, 1), (1, 2), (2, 1), (3, 7), (37, 23),
    (448, 448), (447, 449), (896, 896), (1344, 1344), (1920, 1080),
    (500, 3000), (3000, 500), (20, 2000), (2000, 20), (640, 256), (300, 1000),
)  # fmt: skip
# (min_tiles, max_tiles, use_thumbnail, which images): the default and single-tile settings see every image; the
# others each see a different third (noise and gradients, small and large, the 5:2 tie shape in the (4, 4) one).
ALL, FIRST_THIRD, SECOND_THIRD, LAST_THIRD = slice(None), slice(0, None, 3), slice(1, None, 3), slice(2, None, 3)
CHAT_SETTINGS = ((1, 12, True, ALL), (1, 1, True, ALL), (1, 6, True, FIRST_THIRD), (4, 4, True, SECOND_THIRD),
                 (2, 9, False, LAST_THIRD))  # fmt: skip
HF_SETTINGS = ((1, 12, True, ALL), (1, 1, True, ALL), (1, 6, True, FIRST_THIRD), (4, 4, True, SECOND_THIRD))


def _noise(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _gradient(width: int, height: int) -> Image.Image:
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    x = cols / max(width - 1, 1)
    y = rows / max(height - 1, 1)
    pixels = np.stack([255 * x, 255 * y, 127 + 127 * np.sin(6 * x + 4 * y)], axis=-1)
    return Image.fromarray(np.round(pixels).astype(np.uint8))


@pytest.fixture(scope="module")
def parity_images() -> list[Image.Image]:
    rng = np.random.default_rng(20250826)
    images = []
    for width, height in PARITY_SIZES:
        images.append(_noise(rng, width, height))
        images.append(_gradient(width, height))
    return images


def _assert_same_tiles(ours: list[torch.Tensor], reference: list[torch.Tensor], images: list[Image.Image]) -> None:
    assert len(ours) == len(reference)
    for image, mine, theirs in zip(images, ours, reference):
        assert mine.dtype == torch.float32
        assert tuple(mine.shape) == tuple(theirs.shape), f"tile count differs for {image.size}"
        diff = float((mine - theirs.to(torch.float32)).abs().max())
        assert diff <= MAX_ABS_DIFF, f"{image.size}: max abs diff {diff}"


@pytest.mark.parametrize("min_tiles,max_tiles,use_thumbnail,subset", CHAT_SETTINGS)
def test_chat_style_matches_vllm_internvl_processor(parity_images, min_tiles, max_tiles, use_thumbnail, subset):
    images = parity_images[subset]
    reference = vllm_chat_reference(min_tiles, max_tiles, use_thumbnail, tile_size=TILE)
    config = PreprocessConfig(
        style="chat", min_tiles=min_tiles, max_tiles=max_tiles, use_thumbnail=use_thumbnail, tile_size=TILE
    )
    with ImagePreprocessor(config) as preprocessor:
        ours = preprocessor.preprocess(images)
    _assert_same_tiles(ours, reference(images), images)


@pytest.mark.parametrize("min_tiles,max_tiles,use_thumbnail,subset", HF_SETTINGS)
def test_hf_style_matches_transformers_got_ocr2_processor(parity_images, min_tiles, max_tiles, use_thumbnail, subset):
    images = parity_images[subset]
    reference = vllm_hf_reference(min_tiles, max_tiles, tile_size=TILE)
    config = PreprocessConfig(
        style="hf", min_tiles=min_tiles, max_tiles=max_tiles, use_thumbnail=use_thumbnail, tile_size=TILE
    )
    with ImagePreprocessor(config) as preprocessor:
        ours = preprocessor.preprocess(images)
    _assert_same_tiles(ours, reference(images), images)


@pytest.mark.parametrize("style", ["chat", "hf"])
def test_per_image_max_tiles_override_matches_reference_with_that_maximum(parity_images, style):
    images = parity_images[14:24]  # 896..3000x500 noise and gradients: grids that shrink with the maximum
    overrides = [None, 6, 1, 2, None, 4, 6, 1, 12, 3]
    with ImagePreprocessor(PreprocessConfig(style=style, max_tiles=12)) as preprocessor:
        ours = preprocessor.preprocess(images, max_tiles=overrides)
    for image, override, mine in zip(images, overrides, ours):
        maximum = 12 if override is None else override
        reference = vllm_chat_reference(1, maximum, True) if style == "chat" else vllm_hf_reference(1, maximum)
        _assert_same_tiles([mine], reference([image]), [image])


@pytest.mark.parametrize("num_threads", [1, 3])
def test_thread_count_does_not_change_a_single_value(parity_images, num_threads):
    images = parity_images[10:26]
    with ImagePreprocessor(PreprocessConfig(style="chat", num_threads=2)) as default:
        expected = default.preprocess(images)
    with ImagePreprocessor(PreprocessConfig(style="chat", num_threads=num_threads)) as other:
        actual = other.preprocess(images)
    for want, got in zip(expected, actual):
        assert torch.equal(want, got)


def test_concurrent_callers_share_one_preprocessor(parity_images):
    images = parity_images[12:20]
    with ImagePreprocessor(PreprocessConfig(style="hf")) as preprocessor:
        expected = preprocessor.preprocess(images)
        with ThreadPoolExecutor(4) as callers:
            results = list(callers.map(lambda image: preprocessor.preprocess([image])[0], images))
    for want, got in zip(expected, results):
        assert torch.equal(want, got)


def test_tile_count_matches_preprocessed_tiles(parity_images):
    with ImagePreprocessor(PreprocessConfig(style="chat", max_tiles=6)) as preprocessor:
        tiles = preprocessor.preprocess(parity_images)
        counts = [preprocessor.tile_count(image.width, image.height) for image in parity_images]
    assert counts == [t.shape[0] for t in tiles]


# ---- tiling (pure functions) -------------------------------------------------------------------------------

SWEEP_SIDES = (1, 2, 3, 5, 64, 99, 223, 448, 449, 700, 800, 896, 1000, 1080, 1920, 2000, 3000)
SWEEP_SIZES = [(width, height) for width in SWEEP_SIDES for height in SWEEP_SIDES]
SWEEP_SETTINGS = [(1, 12), (1, 6), (1, 1), (2, 9), (4, 4), (3, 40), (6, 6)]


def test_chat_grid_matches_vllm_over_a_size_sweep():
    for min_tiles, max_tiles in SWEEP_SETTINGS:
        ratios = get_internvl_target_ratios(min_tiles, max_tiles)
        for width, height in SWEEP_SIZES + [(5, 2), (25, 10), (175, 70)]:
            _, target_width, target_height = calculate_internvl_targets(
                orig_width=width, orig_height=height, target_ratios=ratios, image_size=TILE, use_thumbnail=False
            )
            expected = (target_width // TILE, target_height // TILE)
            assert choose_grid(width, height, min_tiles, max_tiles, TILE, order="chat") == expected, (width, height)


def test_hf_grid_matches_transformers_over_a_size_sweep():
    for min_tiles, max_tiles in SWEEP_SETTINGS:
        for width, height in SWEEP_SIZES + [(5, 2), (25, 10), (175, 70)]:
            expected = get_optimal_tiled_canvas((height, width), (TILE, TILE), min_tiles, max_tiles)
            assert choose_grid(width, height, min_tiles, max_tiles, TILE, order="hf") == expected, (width, height)


def test_reference_orders_differ_on_an_exact_tie():
    # min = max = 4 and a 5:2 image: (4, 1) and (2, 2) are equally far from 2.5; the visiting order decides.
    assert choose_grid(25, 10, 4, 4, TILE, order="chat") == (4, 1)
    assert choose_grid(25, 10, 4, 4, TILE, order="hf") == (2, 2)


def test_grid_examples_from_the_model_card_rules():
    assert choose_grid(448, 448, 1, 12, TILE) == (1, 1)
    assert choose_grid(896, 896, 1, 12, TILE) == (2, 2)  # tie with (1, 1): area > half of 2x2 tiles
    assert choose_grid(1344, 1344, 1, 12, TILE) == (3, 3)
    assert choose_grid(1920, 1080, 1, 12, TILE) == (4, 2)
    assert choose_grid(20, 2000, 1, 12, TILE) == (1, 12)
    assert choose_grid(1, 1, 1, 12, TILE) == (1, 1)
    assert choose_grid(500, 500, 3, 2, TILE) == (1, 1)  # no candidate: the reference falls back to one tile


def test_tile_count_includes_the_thumbnail_only_for_multi_tile_grids():
    assert tile_count(448, 448, 1, 12, TILE, use_thumbnail=True) == 1
    assert tile_count(896, 896, 1, 12, TILE, use_thumbnail=True) == 5
    assert tile_count(896, 896, 1, 12, TILE, use_thumbnail=False) == 4
    assert tile_count(1344, 1344, 1, 12, TILE, use_thumbnail=True) == 10
    assert tile_count(4000, 4000, 1, 1, TILE, use_thumbnail=True) == 1


def test_candidate_grids_are_sorted_by_tile_count_within_bounds():
    for order in ("chat", "hf"):
        grids = candidate_grids(2, 12, order)
        products = [cols * rows for cols, rows in grids]
        assert products == sorted(products)
        assert min(products) == 2 and max(products) == 12
        assert len(grids) == len(set(grids)) == 34


def test_tile_boxes_are_row_major():
    assert tile_boxes(3, 2, 10) == [
        (0, 0, 10, 10), (10, 0, 20, 10), (20, 0, 30, 10),
        (0, 10, 10, 20), (10, 10, 20, 20), (20, 10, 30, 20),
    ]  # fmt: skip


# ---- construction --------------------------------------------------------------------------------------------


def test_from_spec_reads_the_checkpoint_spec_attributes():
    spec_stand_in = SimpleNamespace(fmt="hf", image_size=224, min_tiles=2, max_tiles=6, use_thumbnail=False)
    preprocessor = ImagePreprocessor.from_spec(spec_stand_in, num_threads=1)
    config = preprocessor.config
    assert (config.style, config.tile_size, config.min_tiles, config.max_tiles, config.use_thumbnail) == (
        "hf", 224, 2, 6, False,
    )  # fmt: skip
    tiles = preprocessor.preprocess([Image.new("RGB", (600, 300), (10, 20, 30))])[0]
    assert tuple(tiles.shape) == (2, 3, 224, 224)


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError):
        PreprocessConfig(style="chat", min_tiles=5, max_tiles=4)
    with ImagePreprocessor(PreprocessConfig(style="chat", num_threads=1)) as preprocessor:
        with pytest.raises(ValueError):
            preprocessor.preprocess([Image.new("RGBA", (8, 8))])
        with pytest.raises(ValueError):
            preprocessor.preprocess([Image.new("RGB", (8, 8))], max_tiles=[1, 2])
        with pytest.raises(ValueError):
            preprocessor.preprocess([Image.new("RGB", (8, 8))], max_tiles=[0])


# ---- failures ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_a_failing_unit_is_raised_to_the_caller(monkeypatch, num_threads):
    preprocessor = ImagePreprocessor(PreprocessConfig(style="chat", num_threads=num_threads))

    def broken_resize(source, width, height):
        raise RuntimeError("resize failed")

    monkeypatch.setattr(preprocessor._resampler, "resize", broken_resize)
    with pytest.raises(RuntimeError, match="resize failed"):
        preprocessor.preprocess([Image.new("RGB", (900, 500)), Image.new("RGB", (30, 30))])
    preprocessor.close()


@pytest.mark.timeout(60)
def test_a_closed_preprocessor_refuses_work_instead_of_hanging():
    preprocessor = ImagePreprocessor(PreprocessConfig(style="hf", num_threads=2))
    preprocessor.close()
    with pytest.raises(RuntimeError):
        preprocessor.preprocess([Image.new("RGB", (900, 500))])
