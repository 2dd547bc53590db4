"""Decoded RGB images -> normalised tiles `[tiles, 3, tile_size, tile_size]` float32, exactly as the checkpoint's
reference preprocessing (see `preprocess_styles` for what "chat" and "hf" reproduce), spread over a thread pool.

A batch becomes small work units: one resize of the tile canvas per image, one thumbnail (resize + normalise) per
image, and one normalisation per grid tile, submitted as soon as its canvas is ready. Every unit runs in Pillow,
torch or numpy C code with the GIL released, so units of the same and of different images overlap; each writes
straight into its slice of the image's preallocated output tensor. Largest canvases are started first.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from pydantic import Field, model_validator

from dvd_serve.common.config import FrozenConfig
from dvd_serve.vision_worker.preprocess_styles import (
    Resampler,
    Style,
    TileNormaliser,
    resampler_for,
)
from dvd_serve.vision_worker.tiling import TilePlan, plan_tiles, tile_boxes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PreprocessConfig(FrozenConfig):
    """Which reference to reproduce and its tiling settings (a checkpoint's `force_image_size`, dynamic patches)."""

    style: Style = Field(
        description="'chat': original InternVLChatModel format (model card / vLLM internvl.py); "
        "'hf': transformers-native format (GotOcr2 image processor / vLLM interns1.py)."
    )
    tile_size: int = Field(448, gt=0, description="Side of one square tile in pixels (the ViT input size).")
    min_tiles: int = Field(1, ge=1, description="Fewest grid tiles an image is cut into (thumbnail excluded).")
    max_tiles: int = Field(12, ge=1, description="Most grid tiles an image is cut into (thumbnail excluded).")
    use_thumbnail: bool = Field(True, description="Append a whole-image tile after a grid of more than one tile.")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Per-channel mean on the 0..1 scale.")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="Per-channel std on the 0..1 scale.")
    num_threads: int = Field(2, ge=1, description="Worker threads; 1 runs everything in the calling thread.")

    @model_validator(mode="after")
    def _tile_range(self) -> "PreprocessConfig":
        if self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles ({self.min_tiles}) exceeds max_tiles ({self.max_tiles})")
        return self


class ImagePreprocessor:
    """Thread-parallel, reference-exact InternVL preprocessing. Safe to call from several threads at once."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self._resampler: Resampler = resampler_for(config.style)
        self._normalise = TileNormaliser.for_style(config.style, config.mean, config.std)
        self._pool = (
            ThreadPoolExecutor(config.num_threads, thread_name_prefix="preprocess")
            if config.num_threads > 1
            else None
        )

    @classmethod
    def from_spec(cls, spec: Any, *, num_threads: int = 2) -> "ImagePreprocessor":
        """Build from a checkpoint spec exposing `fmt`, `image_size`, `min_tiles`, `max_tiles`, `use_thumbnail`."""
        config = PreprocessConfig(
            style=spec.fmt,
            tile_size=spec.image_size,
            min_tiles=spec.min_tiles,
            max_tiles=spec.max_tiles,
            use_thumbnail=spec.use_thumbnail,
            num_threads=num_threads,
        )
        return cls(config)

    def plan(self, width: int, height: int, max_tiles: int | None = None) -> TilePlan:
        """Tiling of a `width x height` image; `max_tiles` overrides the configured maximum (as the reference
        does, a maximum below `min_tiles` leaves no candidate grid and falls back to a single tile)."""
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
        config = self.config
        return plan_tiles(
            width,
            height,
            config.min_tiles,
            config.max_tiles if max_tiles is None else max_tiles,
            config.tile_size,
            config.use_thumbnail,
            order=config.style,
        )

    def tile_count(self, width: int, height: int, max_tiles: int | None = None) -> int:
        """Tiles (thumbnail included) of a `width x height` image, without touching pixels."""
        return self.plan(width, height, max_tiles).num_tiles

    def preprocess(
        self, images: Sequence[Image.Image], max_tiles: Sequence[int | None] | None = None
    ) -> list[torch.Tensor]:
        """One `[tiles, 3, tile_size, tile_size]` float32 tensor per RGB image; `max_tiles[i]` overrides image i."""
        if max_tiles is not None and len(max_tiles) != len(images):
            raise ValueError(f"got {len(max_tiles)} max_tiles overrides for {len(images)} images")
        overrides = max_tiles if max_tiles is not None else [None] * len(images)
        jobs = [self._job(image, override) for image, override in zip(images, overrides)]
        self._run(jobs)
        return [job.tiles for job in jobs]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "ImagePreprocessor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _job(self, image: Image.Image, max_tiles: int | None) -> "_ImageJob":
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r} (decode with image_decode)")
        plan = self.plan(image.width, image.height, max_tiles)
        size = self.config.tile_size
        tiles = torch.empty((plan.num_tiles, 3, size, size), dtype=torch.float32)
        return _ImageJob(image=image, plan=plan, tiles=tiles, source=self._resampler.prepare(image))

    def _run(self, jobs: list["_ImageJob"]) -> None:
        resizes = sorted(
            (unit for job in jobs for unit in self._resize_units(job)), key=lambda unit: -unit.cost
        )
        if self._pool is None:
            for unit in resizes:
                for follow_up in unit.work() or ():
                    follow_up()
            return
        pending: set[Future] = {self._pool.submit(unit.work) for unit in resizes}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                for follow_up in future.result() or ():
                    pending.add(self._pool.submit(follow_up))

    def _resize_units(self, job: "_ImageJob") -> list["_ResizeUnit"]:
        """The canvas resize (whose result fans out into per-tile units) and the thumbnail of one image."""
        size = self.config.tile_size
        cols, rows = job.plan.grid
        in_pixels = job.image.width * job.image.height
        units = [
            _ResizeUnit(
                cost=in_pixels + cols * rows * size * size,
                work=lambda: self._canvas_tiles(job),
            )
        ]
        if job.plan.thumbnail:
            units.append(_ResizeUnit(cost=in_pixels + size * size, work=lambda: self._thumbnail(job)))
        return units

    def _canvas_tiles(self, job: "_ImageJob") -> list[Callable[[], None]]:
        size = self.config.tile_size
        cols, rows = job.plan.grid
        canvas = self._resampler.resize(job.source, cols * size, rows * size)  # [rows*s, cols*s, 3] uint8
        out = job.tiles.numpy()
        return [
            partial(self._normalise, canvas[top:bottom, left:right].transpose(2, 0, 1), out[index])
            for index, (left, top, right, bottom) in enumerate(tile_boxes(cols, rows, size))
        ]

    def _thumbnail(self, job: "_ImageJob") -> None:
        size = self.config.tile_size
        thumbnail = self._resampler.resize(job.source, size, size)  # [s, s, 3] uint8
        self._normalise(thumbnail.transpose(2, 0, 1), job.tiles.numpy()[-1])


@dataclass(slots=True)
class _ImageJob:
    image: Image.Image
    plan: TilePlan
    tiles: torch.Tensor  # [tiles, 3, s, s] float32, filled in place
    source: object  # what the resampler prepared from `image`


@dataclass(frozen=True, slots=True)
class _ResizeUnit:
    cost: int  # rough pixel work, to start the largest first
    work: Callable[[], list[Callable[[], None]] | None]  # returns follow-up units, if any
