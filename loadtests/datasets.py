"""Seeded chat workloads: request bodies with synthetic images, and Poisson arrival schedules.

Everything here is a pure function of its config: the same `WorkloadConfig` always gives the same bytes, so every
system in a comparison receives exactly the same requests in the same order. Images are a colour gradient with
blocky seeded noise (8-px cells, below the 14-px ViT patch), so every tile differs, routing depends on the image,
and a 1344 px PNG stays near 0.25 MB. Each request has its own text, and its own images unless the workload asks
for repeats (`repeated_image_share`: those requests resend the images of an earlier request of the same segment,
as batch jobs ask many questions about one document); without repeats no prefix or image cache can serve one
request from another.

A dataset file holds one request body per line, JSON without the `model` key (it differs per server);
`with_model` adds it when sending.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from dvd_serve.common.config import FrozenConfig

NOISE_CELL_PX = 8
NOISE_AMPLITUDE = 40
# Words the prompts are drawn from: plain ASCII, so every tokenizer sees text of a similar length.
PROMPT_WORDS = (
    "describe", "the", "image", "colour", "shape", "left", "right", "top", "bottom", "corner", "pattern", "edge",
    "bright", "dark", "count", "regions", "compare", "texture", "gradient", "noise", "summarise", "detail", "scene",
    "centre", "what", "where", "which", "how", "many", "about", "small", "large",
)


class WorkloadConfig(FrozenConfig):
    """One seeded chat workload: what each request carries and how it is sampled."""

    resolution: int = Field(default=448, ge=28, le=8192, description="Side in pixels of every (square) image.")
    images_per_request: int = Field(default=1, ge=0, le=64, description="Images in each request that has images.")
    text_only_share: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Share of requests without images (exactly round(share * n)).",
    )
    num_requests: int = Field(default=64, ge=1, description="Distinct requests in the dataset.")
    prompt_words: int = Field(default=12, ge=1, description="Seeded words of text in every request.")
    max_tokens: int = Field(default=32, ge=1, description="Output tokens asked for (`max_tokens`).")
    ignore_eos: bool = Field(default=True, description="Generate exactly max_tokens (vLLM / dvd-serve extension).")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="Sampling temperature; 0 = greedy.")
    detail: Literal["auto", "low", "high"] | None = Field(
        default=None, description="`image_url.detail` of every image; None leaves it out (server default).",
    )
    logprobs: bool = Field(default=False, description="Ask for the chosen tokens' logprobs (token parity checks).")
    stream: bool = Field(default=True, description="Stream the answer (with a last usage chunk) or answer in one.")
    repeated_image_share: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Share of the requests with images that resend the images of an earlier request of their segment "
        "(exactly round(share * n) of them, as many as the segments allow; the first in a segment is always new).",
    )
    segment_starts: tuple[int, ...] = Field(
        default=(), description="Request indices where a new segment (a benchmark level) starts: repeats never reach "
        "back across one, so no level is served from another's caches. Index 0 always starts one.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of images, texts and which requests are text-only.")


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """A gradient (R across, G down, B diagonal) plus blocky seeded noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    cells_down, cells_across = -(-height // NOISE_CELL_PX), -(-width // NOISE_CELL_PX)
    noise = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(cells_down, cells_across, 3))
    noise = noise.repeat(NOISE_CELL_PX, axis=0).repeat(NOISE_CELL_PX, axis=1)[:height, :width]
    return Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8))


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def text_only_indices(config: WorkloadConfig) -> frozenset[int]:
    """Which requests carry no image: exactly round(share * n) of them, chosen by the seed."""
    count = round(config.text_only_share * config.num_requests)
    order = np.random.default_rng([config.seed, 0]).permutation(config.num_requests)
    return frozenset(int(index) for index in order[:count])


def image_sources(config: WorkloadConfig) -> dict[int, int]:
    """Request index -> the index of the request whose images it carries (itself where they are new); requests
    without images are absent. Repeats are chosen by the seed, and each resends a new image set of its segment."""
    text_only = text_only_indices(config)
    with_images = [index for index in range(config.num_requests) if index not in text_only]
    if config.images_per_request == 0:
        return {}
    starts = sorted({0, *config.segment_starts})
    segment_of = {index: np.searchsorted(starts, index, side="right") for index in with_images}
    first_in_segment = {segment_of[index]: index for index in reversed(with_images)}.values()
    candidates = [index for index in with_images if index not in first_in_segment]
    count = min(round(config.repeated_image_share * len(with_images)), len(candidates))
    order = np.random.default_rng([config.seed, 4]).permutation(len(candidates))
    repeats = {candidates[int(position)] for position in order[:count]}
    sources: dict[int, int] = {}
    fresh_by_segment: dict[int, list[int]] = {}
    for index in with_images:
        fresh = fresh_by_segment.setdefault(segment_of[index], [])
        if index in repeats:
            rng = np.random.default_rng([config.seed, 5, index])
            sources[index] = fresh[int(rng.integers(0, len(fresh)))]
        else:
            sources[index] = index
            fresh.append(index)
    return sources


def request_bodies(config: WorkloadConfig) -> Iterator[dict]:
    """The chat completion bodies, without `model`."""
    sources = image_sources(config)
    for index in range(config.num_requests):
        rng = np.random.default_rng([config.seed, 1, index])
        words = " ".join(PROMPT_WORDS[int(i)] for i in rng.integers(0, len(PROMPT_WORDS), config.prompt_words))
        images = config.images_per_request if index in sources else 0
        parts: list[dict] = [_image_part(config, sources.get(index, index), image) for image in range(images)]
        parts.append({"type": "text", "text": f"Request {index}: {words}"})
        body = {
            "messages": [{"role": "user", "content": parts}],
            "max_tokens": config.max_tokens,
            "temperature": config.temperature,
        }
        if config.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if config.ignore_eos:
            body["ignore_eos"] = True
        if config.logprobs:
            body["logprobs"] = True
        yield body


def _image_part(config: WorkloadConfig, request_index: int, image_index: int) -> dict:
    seed = int(np.random.SeedSequence([config.seed, 2, request_index, image_index]).generate_state(1)[0])
    image_url: dict = {"url": png_data_url(synthetic_image(config.resolution, config.resolution, seed))}
    if config.detail is not None:
        image_url["detail"] = config.detail
    return {"type": "image_url", "image_url": image_url}


def write_dataset(config: WorkloadConfig, path: Path) -> Path:
    """Writes the dataset file (one compact JSON body per line) and returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for body in request_bodies(config):
            out.write(json.dumps(body, separators=(",", ":")) + "\n")
    return path


def read_dataset(path: Path) -> list[bytes]:
    """The request bodies of a dataset file, as the bytes to send (still without `model`)."""
    with path.open("rb") as source:
        return [line.rstrip(b"\n") for line in source if line.strip()]


def with_model(body: bytes, model: str) -> bytes:
    """`body` (a JSON object without `model`) with `"model": model` as its first key, without re-encoding it."""
    if not body.startswith(b"{"):
        raise ValueError("a request body must be a JSON object")
    rest = body[1:].lstrip()
    separator = b"" if rest.startswith(b"}") else b","
    return b'{"model":' + json.dumps(model).encode("utf-8") + separator + rest


def poisson_arrivals(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    """Open-loop arrival times in [0, duration_s): exponential gaps of mean 1 / rate, fixed by the seed."""
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    rng = np.random.default_rng([seed, 3])
    arrivals: list[float] = []
    now = float(rng.exponential(1.0 / rate_per_s))
    while now < duration_s:
        arrivals.append(now)
        now += float(rng.exponential(1.0 / rate_per_s))
    return arrivals
