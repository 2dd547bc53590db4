"""The ViR decision rule, applied per request, and the per-image detail policy.

Published rule (Flash `modeling_internvl_chat.py` `generate_flash`; lmdeploy `extract_and_compress`): with p0 the
gate's column 0, tile t is compressed iff `p0[t] > torch.quantile(p0, flash_relative_threshold)` (linear
interpolation, computed in float32) and `p0[t] >= flash_absolute_threshold`. Consequences kept here:
- one tile alone is never compressed (the quantile of one value is that value, and `>` is strict);
- equal p0 everywhere compresses nothing; tiles tied with the quantile value stay at 256 tokens;
- relative 1 compresses nothing; relative 0 compresses everything above the minimum that passes the absolute bar;
- a NaN p0 makes the quantile NaN, so nothing in that request is compressed (the 256-token fallback);
- the thumbnail is a tile like any other.

Scope of the quantile: the reference takes it over every tile passed to one `generate` call. `chat()` sends all
images of one request together, so alone a request is routed over all of its tiles (all images together);
`batch_chat()` and lmdeploy's engine pool the tiles of every request in the batch, which makes a request's
tokens depend on its neighbours. Here the quantile is always taken per request (`route_batch`), which equals
the reference for a request processed alone and never depends on what else is batched.

Detail policy, per image (`split_by_detail`): `high` keeps 256 tokens per tile, `low` takes 64 per tile, and the
tiles of `auto` images are decided by the rule over the `auto` tiles of their own request.

Where this deliberately differs from the reference in bf16: p0 is compared with both thresholds in float32
(the reference compares the bf16 p0 with the float32 quantile after casting it back to bf16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dvd_serve.common.chat import Detail

# 32x32 ViT tokens per tile: pixel shuffle 0.5 keeps 16x16 = 256, pixel shuffle 0.25 keeps 8x8 = 64.
TOKENS_FULL = 256
TOKENS_COMPRESSED = 64


def _check_threshold(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _check_p0(p0: Tensor) -> None:
    if p0.dim() != 1:
        raise ValueError(f"p0 must be 1-D [tiles], got shape {tuple(p0.shape)}")


def decide_compression(p0: Tensor, relative_threshold: float, absolute_threshold: float) -> Tensor:
    """p0: [tiles] of ONE request -> bool [tiles], True = compress the tile to 64 tokens."""
    _check_p0(p0)
    _check_threshold("relative_threshold", relative_threshold)
    _check_threshold("absolute_threshold", absolute_threshold)
    if p0.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=p0.device)
    p0 = p0.float()
    cutoff = torch.quantile(p0, relative_threshold, interpolation="linear")
    return (p0 > cutoff) & (p0 >= absolute_threshold)


def route_batch(
    p0: Tensor, request_tile_counts: Sequence[int], relative_threshold: float, absolute_threshold: float
) -> Tensor:
    """p0: [tiles] of several requests laid end to end -> bool [tiles], each request decided on its own tiles."""
    _check_p0(p0)
    counts = [int(count) for count in request_tile_counts]
    if any(count < 0 for count in counts) or sum(counts) != p0.numel():
        raise ValueError(f"request_tile_counts {counts} do not add up to the {p0.numel()} tiles of p0")
    decisions = [
        decide_compression(segment, relative_threshold, absolute_threshold) for segment in torch.split(p0, counts)
    ]
    return torch.cat(decisions) if decisions else torch.zeros(0, dtype=torch.bool, device=p0.device)


@dataclass(frozen=True, slots=True)
class DetailSplit:
    """Which tiles the detail policy fixes and which the rule decides, for requests laid end to end."""

    fixed: Tensor  # bool [tiles]: True for tiles of `low` images; False for `high` and (for now) `auto` tiles
    auto_index: Tensor  # long [auto tiles]: the tiles of `auto` images, request after request
    auto_tile_counts: list[int]  # `auto` tiles per request: the segments of `route_batch`


def split_by_detail(
    tiles_per_image: Sequence[Sequence[int]], details: Sequence[Sequence[Detail | str]]
) -> DetailSplit:
    """Per request, per image: `high` keeps 256 tokens, `low` takes 64, `auto` tiles go to the rule.

    The quantile of an `auto` image is taken over the `auto` tiles of its own request (all of them when every
    image of the request is `auto`, which is the reference's setting).
    """
    fixed: list[bool] = []
    auto_index: list[int] = []
    auto_tile_counts: list[int] = []
    for request_tiles, request_details in zip(tiles_per_image, details, strict=True):
        auto_in_request = 0
        for count, detail in zip(request_tiles, request_details, strict=True):
            detail = Detail(detail)
            if detail is Detail.AUTO:
                auto_index.extend(range(len(fixed), len(fixed) + count))
                auto_in_request += count
            fixed.extend([detail is Detail.LOW] * count)
        auto_tile_counts.append(auto_in_request)
    return DetailSplit(
        fixed=torch.tensor(fixed, dtype=torch.bool),
        auto_index=torch.tensor(auto_index, dtype=torch.long),
        auto_tile_counts=auto_tile_counts,
    )


def tokens_per_tile(decisions: Tensor) -> list[int]:
    """bool [tiles] -> the number of LLM tokens each tile contributes (64 if compressed, else 256)."""
    return [TOKENS_COMPRESSED if compress else TOKENS_FULL for compress in decisions.tolist()]
