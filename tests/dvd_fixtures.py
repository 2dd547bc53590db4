"""Shared helpers for end-to-end tests: deterministic test images and a monolithic vLLM reference run."""

from __future__ import annotations

import base64
import gc
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

# (width, height) chosen so the default tiling (max 12 + thumbnail) gives 1, 3, 5, 7, 10 and 13 tiles.
SIZES_BY_TILES = {1: (448, 448), 3: (896, 448), 5: (896, 896), 7: (1344, 896), 10: (1344, 1344), 13: (1792, 1344)}


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """Noise over a gradient: every tile differs, so routing and tokens depend on the image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-60, 60, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def monolithic_vllm_greedy(
    model: str, prompts: Sequence[tuple[str, Sequence[Image.Image]]], *, trust_remote_code: bool, max_tokens: int,
    max_model_len: int = 8192, hf_overrides: dict | None = None,
) -> list[list[int]]:
    """Greedy token ids from vLLM run monolithically on pixels (its own preprocessing and vision tower)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model, trust_remote_code=trust_remote_code, dtype="float32", max_model_len=max_model_len,
        enforce_eager=True, distributed_executor_backend="uni", limit_mm_per_prompt={"image": 4},
        hf_overrides=hf_overrides or {}, seed=0,
    )
    try:
        outputs = llm.generate(
            [{"prompt": prompt, "multi_modal_data": {"image": list(images)}} for prompt, images in prompts],
            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
            use_tqdm=False,
        )
        return [list(output.outputs[0].token_ids) for output in outputs]
    finally:
        del llm
        gc.collect()
