"""Images/s of our InternVL preprocessing against vLLM's, for both checkpoint styles, in one run.

    python -m dvd_serve.loadtests.benchmarks.preprocess [--per-size 4] [--repetitions 7] [--threads 2]
        [--torch-threads N]

The image set mixes 448x448, 896x896, 1344x1344 and 1920x1080 photos-like synthetic images, JPEG-encoded and
decoded with `image_decode` before timing. References are vLLM's own code paths:
- chat: vLLM's `InternVLImageProcessor` (vllm/transformers_utils/processors/internvl.py), one call per batch;
- hf: the image processor transformers' `AutoImageProcessor` resolves for an InternVL3.5-HF
  `preprocessor_config.json` (torchvision-backend `GotOcr2ImageProcessor`), one call per image as vLLM's
  `interns1.py` makes it.
Ours and the reference alternate within every repetition so background load hits both alike; process CPU time
per image is reported too, since on a shared machine wall-clock rates swing with other load (torch's OpenMP
threads in the references burn CPU waiting for a busy core). Each style's outputs are compared once (max abs
diff). The last line is JSON with the ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from dvd_serve.common.torch_compat import ensure_torchvision_importable
from dvd_serve.vision_worker.image_decode import DecodeLimits, decode_image
from dvd_serve.vision_worker.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessor, PreprocessConfig

BENCHMARK_SIZES = ((448, 448), (896, 896), (1344, 1344), (1920, 1080))
# The image-processor settings InternVL3.5 `-HF` checkpoints ship in preprocessor_config.json.
INTERNVL_HF_IMAGE_PROCESSOR_CONFIG = {
    "image_processor_type": "GotOcr2ImageProcessorFast",
    "processor_class": "InternVLProcessor",
    "crop_to_patches": True,
    "min_patches": 1,
    "max_patches": 12,
    "size": {"height": 448, "width": 448},
    "resample": 3,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
    "do_convert_rgb": True,
}

Preprocess = Callable[[Sequence[Image.Image]], list[torch.Tensor]]


def vllm_chat_reference(min_tiles: int, max_tiles: int, use_thumbnail: bool, tile_size: int = 448) -> Preprocess:
    """vLLM's preprocessing for original-format (InternVLChatModel) checkpoints."""
    ensure_torchvision_importable()
    from vllm.transformers_utils.processors.internvl import InternVLImageProcessor

    processor = InternVLImageProcessor(
        image_size=tile_size,
        min_dynamic_patch=min_tiles,
        max_dynamic_patch=max_tiles,
        dynamic_image_size=True,
        use_thumbnail=use_thumbnail,
    )

    def run(images: Sequence[Image.Image]) -> list[torch.Tensor]:
        batch = processor(list(images))
        return list(batch["pixel_values_flat"].split(batch["image_num_patches"].tolist()))

    return run


def vllm_hf_reference(min_tiles: int, max_tiles: int, tile_size: int = 448) -> Preprocess:
    """The image processor vLLM's interns1 path gets for a transformers-native checkpoint, called per image."""
    ensure_torchvision_importable()
    from transformers import AutoImageProcessor

    config = dict(INTERNVL_HF_IMAGE_PROCESSOR_CONFIG, min_patches=min_tiles, max_patches=max_tiles)
    config["size"] = {"height": tile_size, "width": tile_size}
    with tempfile.TemporaryDirectory(prefix="internvl-hf-processor-") as folder:
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(config))
        processor = AutoImageProcessor.from_pretrained(folder)

    def run(images: Sequence[Image.Image]) -> list[torch.Tensor]:
        return [processor(images=image, return_tensors="pt")["pixel_values"] for image in images]

    return run


def benchmark_images(per_size: int, seed: int = 0) -> list[Image.Image]:
    """Photo-like images (smooth shading, edges, sensor noise), JPEG round-tripped through `decode_image`."""
    rng = np.random.default_rng(seed)
    images = []
    for width, height in BENCHMARK_SIZES:
        for _ in range(per_size):
            encoded = io.BytesIO()
            Image.fromarray(_photo_like_pixels(rng, width, height)).save(encoded, "JPEG", quality=90)
            images.append(decode_image(encoded.getvalue(), DecodeLimits()))
    return images


def _photo_like_pixels(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    shading = np.stack(
        [127 + 100 * np.sin(cols / (40 + 30 * k) + rows / (55 + 20 * k) + phase[k]) for k in range(3)], axis=-1
    )
    edges = ((cols // 97 + rows // 61) % 2)[..., None] * 40
    noise = rng.normal(0, 8, size=(height, width, 3))
    return np.clip(shading + edges + noise, 0, 255).astype(np.uint8)


def _time_once(run: Preprocess, images: Sequence[Image.Image]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; CPU time is less sensitive to a busy machine."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    run(images)
    return time.perf_counter() - wall_start, time.process_time() - cpu_start


def _max_abs_diff(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    if [t.shape for t in ours] != [t.shape for t in reference]:
        return float("inf")
    return max(float((a - b).abs().max()) for a, b in zip(ours, reference))


def compare_style(style: str, images: list[Image.Image], repetitions: int, threads: int) -> dict[str, float]:
    reference = vllm_chat_reference(1, 12, True) if style == "chat" else vllm_hf_reference(1, 12)
    preprocessor = ImagePreprocessor(PreprocessConfig(style=style, num_threads=threads))
    try:
        max_diff = _max_abs_diff(preprocessor.preprocess(images), reference(images))  # also the warm-up
        ours, reference_runs = [], []
        for _ in range(repetitions):
            reference_runs.append(_time_once(reference, images))
            ours.append(_time_once(preprocessor.preprocess, images))
    finally:
        preprocessor.close()
    tiles = sum(preprocessor.tile_count(image.width, image.height) for image in images)
    ours_s, reference_s = [wall for wall, _ in ours], [wall for wall, _ in reference_runs]
    ours_rate = len(images) / statistics.median(ours_s)
    reference_rate = len(images) / statistics.median(reference_s)
    ours_cpu_ms = 1000 * statistics.median(cpu for _, cpu in ours) / len(images)
    reference_cpu_ms = 1000 * statistics.median(cpu for _, cpu in reference_runs) / len(images)
    return {
        "ours_images_per_s": round(ours_rate, 2),
        "vllm_images_per_s": round(reference_rate, 2),
        "ours_tiles_per_s": round(ours_rate * tiles / len(images), 1),
        "vllm_tiles_per_s": round(reference_rate * tiles / len(images), 1),
        "ratio": round(ours_rate / reference_rate, 2),
        # each repetition times the reference and ours back to back: the median of those pairs' ratios is the
        # figure least moved by other load on the machine
        "paired_ratio": round(statistics.median(ref / mine for ref, mine in zip(reference_s, ours_s)), 2),
        "ours_best_images_per_s": round(len(images) / min(ours_s), 2),
        "vllm_best_images_per_s": round(len(images) / min(reference_s), 2),
        "ours_cpu_ms_per_image": round(ours_cpu_ms, 1),
        "vllm_cpu_ms_per_image": round(reference_cpu_ms, 1),
        "cpu_ratio": round(reference_cpu_ms / ours_cpu_ms, 2),
        "max_abs_diff": max_diff,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-size", type=int, default=4, help="images of each of the four sizes")
    parser.add_argument("--repetitions", type=int, default=7, help="timed runs per implementation and style")
    parser.add_argument("--threads", type=int, default=2, help="our preprocessor's worker threads")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch intra-op threads for both (default: torch's own)"
    )
    args = parser.parse_args(argv)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    images = benchmark_images(args.per_size)
    results = {style: compare_style(style, images, args.repetitions, args.threads) for style in ("chat", "hf")}

    print(f"{len(images)} images ({args.per_size} each of {BENCHMARK_SIZES}), {args.repetitions} repetitions, "
          f"median; torch intra-op threads {torch.get_num_threads()}, ours {args.threads} worker threads")
    print(f"{'style':<6}{'vLLM img/s':>12}{'ours img/s':>12}{'ratio':>7}{'paired':>8}{'vLLM tiles/s':>14}"
          f"{'ours tiles/s':>14}{'vLLM cpu ms/img':>17}{'ours cpu ms/img':>17}{'max |diff|':>12}")
    for style, row in results.items():
        print(f"{style:<6}{row['vllm_images_per_s']:>12.2f}{row['ours_images_per_s']:>12.2f}{row['ratio']:>7.2f}"
              f"{row['paired_ratio']:>8.2f}{row['vllm_tiles_per_s']:>14.1f}{row['ours_tiles_per_s']:>14.1f}"
              f"{row['vllm_cpu_ms_per_image']:>17.1f}{row['ours_cpu_ms_per_image']:>17.1f}{row['max_abs_diff']:>12.2g}")
    print(json.dumps({
        "benchmark": "preprocess",
        "images": len(images),
        "repetitions": args.repetitions,
        "threads": args.threads,
        "results": results,
        "ratios": {style: row["ratio"] for style, row in results.items()},
        "paired_ratios": {style: row["paired_ratio"] for style, row in results.items()},
    }))


if __name__ == "__main__":
    main()
