"""VisionEncoder: tiles of many images in one batch -> per-image LLM-width embeddings and tokens per tile.

For a Flash checkpoint the ViT runs once per tile, the router picks 256 or 64 tokens per tile, and only the
projector each tile needs runs (the reference computes both for every tile).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from dvd_serve.common.chat import Detail
from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.config import FrozenConfig
from dvd_serve.router.decision import TOKENS_COMPRESSED, TOKENS_FULL, decide_compression
from dvd_serve.vision_worker.projector import make_mlp1, make_mlp2, shuffle_to_tokens
from dvd_serve.vision_worker.vision_weights import load_vision_tensors
from dvd_serve.vision_worker.vit import InternViT, VitConfig

class VisionEncoderConfig(FrozenConfig):
    """How a vision replica loads and runs the vision side of a checkpoint."""

    model: str = Field(description="Checkpoint folder (either format, Flash included).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Compute dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    device: str = Field(default="auto", description="torch device; auto = cuda if available, else cpu.")
    max_tiles_per_forward: int = Field(
        default=64, ge=1, description="Tiles per ViT forward; larger batches are split to bound activation memory."
    )
    router_relative_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Override of the checkpoint's flash_relative_threshold (quantile level of p0 per request).",
    )
    router_absolute_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Override of the checkpoint's flash_absolute_threshold (least p0 of a compressed tile).",
    )


@dataclass(frozen=True, slots=True)
class EncodeRequest:
    """The images of one client request; routing decisions are taken over its tiles only."""

    images: Sequence[torch.Tensor]  # each [tiles, 3, 448, 448]
    details: Sequence[Detail]  # one per image


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """One image's visual tokens, ready for the language model."""

    embeddings: torch.Tensor  # [tokens, llm_hidden]
    tokens_per_tile: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TileEmbeddings:
    """One image's projected tiles before its request's routing picks 256 or 64 tokens per tile (CPU tensors)."""

    full: torch.Tensor | None  # [tiles, 256, llm_hidden] from mlp1; None for a Flash `low` image
    small: torch.Tensor | None  # [tiles, 64, llm_hidden] from mlp2; Flash `low` and `auto` images only
    p0: torch.Tensor | None  # float32 [tiles], the router's probability that 64 tokens suffice; Flash `auto` only

    @property
    def tiles(self) -> int:
        present = self.full if self.full is not None else self.small
        return int(present.shape[0])  # type: ignore[union-attr]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.full, self.small, self.p0) if t is not None)

    def select(self, compress: torch.Tensor) -> EncodedImage:
        """compress: bool [tiles] (True = 64 tokens) -> the image's embeddings in tile order."""
        flags = compress.tolist()
        if not any(flags):
            return EncodedImage(self.full.flatten(0, 1), (TOKENS_FULL,) * len(flags))  # type: ignore[union-attr]
        if all(flags):
            return EncodedImage(self.small.flatten(0, 1), (TOKENS_COMPRESSED,) * len(flags))  # type: ignore[union-attr]
        rows = [self.small[t] if flag else self.full[t] for t, flag in enumerate(flags)]  # type: ignore[index]
        return EncodedImage(torch.cat(rows), tuple(TOKENS_COMPRESSED if flag else TOKENS_FULL for flag in flags))


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def vit_config_from_spec(spec: CheckpointSpec) -> VitConfig:
    return VitConfig(
        hidden_size=spec.vit_hidden,
        num_layers=spec.vit_layers,
        num_heads=spec.vit_heads,
        intermediate_size=spec.vit_intermediate,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        qkv_bias=spec.vit_qkv_bias,
        qk_norm=spec.vit_qk_norm,
        norm_type=spec.vit_norm_type,
        layer_norm_eps=spec.vit_layer_norm_eps,
    )


class VisionEncoder:
    """The vision side of one checkpoint: ViT, mlp1, and for Flash checkpoints mlp2 and the router."""

    def __init__(self, spec: CheckpointSpec, tensors: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, max_tiles_per_forward: int = 64,
                 relative_threshold: float | None = None, absolute_threshold: float | None = None) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.max_tiles_per_forward = max_tiles_per_forward
        self.vit = InternViT(vit_config_from_spec(spec))
        self.vit.load_state_dict(_with_prefix(tensors, ("embeddings.", "encoder.")), strict=True)
        llm_hidden = spec.llm_hidden
        self.mlp1 = make_mlp1(spec.vit_hidden * 4, llm_hidden)
        self.mlp1.load_state_dict(_strip_prefix(tensors, "mlp1."), strict=True)
        self.mlp2 = None
        self.router = None
        if spec.flash:
            from dvd_serve.router.vir import VisualResolutionRouter

            self.mlp2 = make_mlp2(spec.vit_hidden * 16, llm_hidden)
            self.mlp2.load_state_dict(_strip_prefix(tensors, "mlp2."), strict=True)
            from dvd_serve.router.config import RouterConfig

            router_config = RouterConfig(
                vit_hidden_size=spec.vit_hidden,
                relative_threshold=_first_set(relative_threshold, spec.flash_relative_threshold),
                absolute_threshold=_first_set(absolute_threshold, spec.flash_absolute_threshold),
            )
            router_tensors = _with_prefix(tensors, ("pooling_before_gating.", "gating."))
            self.router = VisualResolutionRouter.from_state_dict(router_tensors, router_config)
        for module in (self.vit, self.mlp1, self.mlp2, self.router):
            if module is not None:
                module.to(device=device, dtype=dtype).eval()

    @property
    def router_thresholds(self) -> tuple[float, float] | None:
        """(relative, absolute) of the router in use, None without one."""
        if self.router is None:
            return None
        return self.router.config.relative_threshold, self.router.config.absolute_threshold

    @classmethod
    def from_config(cls, config: VisionEncoderConfig) -> "VisionEncoder":
        spec = CheckpointSpec.from_dir(config.model)
        device = _resolve_device(config.device)
        dtype = _resolve_dtype(config.dtype, device)
        tensors = load_vision_tensors(Path(config.model), spec, dtype=dtype)
        return cls(
            spec, tensors, device, dtype, config.max_tiles_per_forward,
            config.router_relative_threshold, config.router_absolute_threshold,
        )

    @torch.inference_mode()
    def vit_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """tiles: [tiles, 3, 448, 448] -> patch tokens [tiles, 1024, vit], in micro-batches."""
        chunks = tiles.split(self.max_tiles_per_forward)
        return torch.cat([
            self.vit(chunk.to(self.device, self.dtype, non_blocking=True), self.spec.select_layer) for chunk in chunks
        ])

    @torch.inference_mode()
    def encode(
        self,
        images: Sequence[torch.Tensor],
        compress: Sequence[torch.Tensor] | None = None,
    ) -> list[EncodedImage]:
        """Encode a batch of images (each `[tiles, 3, 448, 448]`) in one pass.

        `compress[i]` is a bool tensor `[tiles_i]` (True = 64 tokens) decided by the caller, or None for all
        tiles at 256. Routing decisions are made with `route(...)` on `vit_features` when a router is present;
        `encode_routed` does both for one request.
        """
        features = self.vit_features(torch.cat(list(images)))
        flags = (
            torch.cat([c.to(torch.bool).cpu() for c in compress])
            if compress is not None
            else torch.zeros(features.shape[0], dtype=torch.bool)
        )
        return self.project(features, flags, [image.shape[0] for image in images])

    @torch.inference_mode()
    def encode_tiles(self, requests: Sequence[EncodeRequest]) -> list[list[TileEmbeddings]]:
        """Encode the images of several requests in one ViT pass, up to what each image's detail may need.

        Nothing here depends on a request's other images, so the result of one image can be cached and reused in
        any later request; `assemble` then takes the per-request routing decisions.
        """
        images = [image for request in requests for image in request.images]
        details = [self.encoded_detail(detail) for request in requests for detail in request.details]
        features = self.vit_features(torch.cat(images))  # [tiles, 1024, vit]
        bounds = _bounds([image.shape[0] for image in images])
        full = _run_selected(lambda tiles: self.mlp1(shuffle_to_tokens(tiles, 0.5)), features, bounds,
                             [d is not Detail.LOW for d in details])  # [tiles, 256, llm] per image
        small = _run_selected(lambda tiles: self.mlp2(shuffle_to_tokens(tiles, 0.25)), features, bounds,
                              [self.mlp2 is not None and d is not Detail.HIGH for d in details])  # [tiles, 64, llm]
        p0 = _run_selected(lambda tiles: self.router.compress_probability(tiles).float(), features, bounds,
                           [self.router is not None and d is Detail.AUTO for d in details])  # float32 [tiles]
        encoded = [TileEmbeddings(full=f, small=s, p0=p) for f, s, p in zip(full, small, p0, strict=True)]
        out: list[list[TileEmbeddings]] = []
        for request in requests:
            out.append(encoded[:len(request.images)])
            encoded = encoded[len(request.images):]
        return out

    def assemble(self, images: Sequence[TileEmbeddings], details: Sequence[Detail]) -> list[EncodedImage]:
        """One request's images -> embeddings: `high` tiles keep 256 tokens, `low` take 64, and the tiles of `auto`
        images are decided by the ViR rule over the `auto` tiles of this request (its quantile spans them all)."""
        details = [self.encoded_detail(detail) for detail in details]
        compress = [torch.full((image.tiles,), detail is Detail.LOW) for image, detail in zip(images, details)]
        auto = [index for index, detail in enumerate(details) if detail is Detail.AUTO]
        if auto:
            config = self.router.config  # type: ignore[union-attr]  # `auto` survives only on Flash
            decided = decide_compression(
                torch.cat([images[index].p0 for index in auto]),  # type: ignore[misc]
                config.relative_threshold, config.absolute_threshold,
            )
            for index, flags in zip(auto, decided.split([images[index].tiles for index in auto]), strict=True):
                compress[index] = flags
        return [image.select(flags) for image, flags in zip(images, compress, strict=True)]

    def encode_requests(self, requests: Sequence[EncodeRequest]) -> list[list[EncodedImage]]:
        """`encode_tiles` then `assemble` per request: the embeddings of requests encoded without a cache."""
        return [
            self.assemble(images, request.details)
            for images, request in zip(self.encode_tiles(requests), requests, strict=True)
        ]

    def encoded_detail(self, detail: Detail) -> Detail:
        """The detail the encoder works to: without a router every tile has 256 tokens (`high`); `low` is then a
        tiling choice (one thumbnail tile) made before the encoder."""
        return Detail(detail) if self.router is not None else Detail.HIGH

    @torch.inference_mode()
    def project(self, features: torch.Tensor, compress: torch.Tensor, tiles_per_image: Sequence[int]) -> list[EncodedImage]:
        """features: [tiles, 1024, vit], compress: bool [tiles] -> per-image embeddings in tile order."""
        if bool(compress.any()) and self.mlp2 is None:
            raise ValueError("this checkpoint has no 64-token projector (not a Flash checkpoint)")
        full_idx = (~compress).nonzero().flatten().to(features.device)
        small_idx = compress.nonzero().flatten().to(features.device)
        per_tile: list[torch.Tensor | None] = [None] * features.shape[0]
        if full_idx.numel():
            full = self.mlp1(shuffle_to_tokens(features[full_idx], 0.5))  # [n, 256, llm]
            for position, tile in enumerate(full_idx.tolist()):
                per_tile[tile] = full[position]
        if small_idx.numel():
            small = self.mlp2(shuffle_to_tokens(features[small_idx], 0.25))  # [n, 64, llm]
            for position, tile in enumerate(small_idx.tolist()):
                per_tile[tile] = small[position]
        results: list[EncodedImage] = []
        start = 0
        for count in tiles_per_image:
            tiles = per_tile[start:start + count]
            results.append(EncodedImage(
                embeddings=torch.cat(tiles),  # type: ignore[arg-type]
                tokens_per_tile=tuple(t.shape[0] for t in tiles),  # type: ignore[union-attr]
            ))
            start += count
        return results


def _bounds(tiles_per_image: Sequence[int]) -> list[tuple[int, int]]:
    """Tile counts -> each image's [start, end) in the tiles laid end to end."""
    return [(end - count, end) for count, end in zip(tiles_per_image, itertools.accumulate(tiles_per_image))]


def _run_selected(module: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor,
                  bounds: list[tuple[int, int]], wanted: list[bool]) -> list[torch.Tensor | None]:
    """Runs `module` once over the tiles of the wanted images (features [tiles, 1024, vit]) -> its output split per
    wanted image, on the CPU; None for the others."""
    if not any(wanted):
        return [None] * len(bounds)
    chosen = [bound for bound, want in zip(bounds, wanted) if want]
    output = module(torch.cat([features[start:end] for start, end in chosen])).cpu()
    per_image = iter(output.split([end - start for start, end in chosen]))
    return [next(per_image) if want else None for want in wanted]


def _first_set(override: float | None, checkpoint_value: float | None) -> float:
    if override is not None:
        return override
    if checkpoint_value is None:
        raise ValueError("the Flash checkpoint does not define its router thresholds; pass them explicitly")
    return checkpoint_value


def _with_prefix(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in tensors.items() if name.startswith(prefixes)}


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): tensor for name, tensor in tensors.items() if name.startswith(prefix)}
