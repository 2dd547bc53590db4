"""Decoded RGB images -> normalised tiles `[tiles, 3, tile_size, tile_size]` float32, exactly as the checkpoint's
reference preprocessing (see `preprocess_styles` for what "chat" and "hf" reproduce), spread over a thread pool.

A batch becomes small work units: per image a preparation (the resampler's input, e.g. the uint8 tensor), which
unlocks the resize of the tile canvas and the thumbnail (resize + normalise); each canvas unlocks one normalisation
per grid tile. A unit is submitted as soon as what it needs is ready, largest images first. Every unit runs in
Pillow, torch or numpy C code with the GIL released, so units of the same and of different images overlap, and
each writes straight into its slice of the image's preallocated output tensor.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
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
        largest_first = sorted(jobs, key=self._pixel_work, reverse=True)
        _run_units([partial(self._prepare, job) for job in largest_first], self._pool)
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
        image.load()  # here, not in a worker: a lazily opened file must not be decoded by two threads at once
        plan = self.plan(image.width, image.height, max_tiles)
        size = self.config.tile_size
        tiles = torch.empty((plan.num_tiles, 3, size, size), dtype=torch.float32)
        return _ImageJob(image=image, plan=plan, tiles=tiles)

    def _pixel_work(self, job: "_ImageJob") -> int:
        return job.image.width * job.image.height + job.plan.num_tiles * self.config.tile_size**2

    def _prepare(self, job: "_ImageJob") -> list["_Unit"]:
        """Unit: the resampler's per-image preparation; unlocks the canvas and the thumbnail."""
        job.source = self._resampler.prepare(job.image)
        unlocked: list[_Unit] = [partial(self._canvas_tiles, job)]
        if job.plan.thumbnail:
            unlocked.append(partial(self._thumbnail, job))
        return unlocked

    def _canvas_tiles(self, job: "_ImageJob") -> list["_Unit"]:
        """Unit: resize to the tile grid; unlocks one normalisation per grid tile."""
        size = self.config.tile_size
        cols, rows = job.plan.grid
        canvas = self._resampler.resize(job.source, cols * size, rows * size)  # [rows*s, cols*s, 3] uint8
        out = job.tiles.numpy()
        return [
            partial(self._normalise, canvas[top:bottom, left:right].transpose(2, 0, 1), out[index])
            for index, (left, top, right, bottom) in enumerate(tile_boxes(cols, rows, size))
        ]

    def _thumbnail(self, job: "_ImageJob") -> None:
        """Unit: the whole image as the last tile."""
        size = self.config.tile_size
        thumbnail = self._resampler.resize(job.source, size, size)  # [s, s, 3] uint8
        self._normalise(thumbnail.transpose(2, 0, 1), job.tiles.numpy()[-1])


# A piece of work for the pool; it returns the units it made possible (none when it is a leaf).
_Unit = Callable[[], "list[_Unit] | None"]


@dataclass(slots=True)
class _ImageJob:
    image: Image.Image
    plan: TilePlan
    tiles: torch.Tensor  # [tiles, 3, s, s] float32, filled in place by the units
    source: object = None  # what the resampler prepared from `image`, set by the prepare unit


def _run_units(units: list[_Unit], pool: ThreadPoolExecutor | None) -> None:
    """Run `units` and, transitively, every unit they unlock: on `pool`, or depth-first in this thread."""
    if pool is None:
        stack = list(reversed(units))
        while stack:
            stack.extend(reversed(stack.pop()() or ()))
        return
    _PoolRun(pool).run(units)


class _PoolRun:
    """One batch on the pool. Workers submit the units they unlock themselves, so the caller only waits.

    `_outstanding` counts units submitted and not yet finished, plus one while the caller is still submitting; a
    unit submits what it unlocks before it counts itself finished, so the count reaches zero exactly once.
    """

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._outstanding = 1  # the caller's own share until all first units are submitted
        self._finished = threading.Event()
        self._error: BaseException | None = None

    def run(self, units: list[_Unit]) -> None:
        try:
            self._submit(units)
        except BaseException as error:  # noqa: BLE001 - re-raised below once submitted units are done
            self._error = error
        self._count_finished()
        self._finished.wait()
        if self._error is not None:
            raise self._error

    def _submit(self, units: list[_Unit]) -> None:
        for unit in units:
            with self._lock:
                self._outstanding += 1
            try:
                self._pool.submit(self._execute, unit)
            except BaseException:  # e.g. the pool was shut down: this unit will never run
                self._count_finished()
                raise

    def _execute(self, unit: _Unit) -> None:
        try:
            unlocked = unit()
            if unlocked and self._error is None:
                self._submit(unlocked)
        except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
            self._error = self._error or error
        finally:
            self._count_finished()

    def _count_finished(self) -> None:
        with self._lock:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._finished.set()
